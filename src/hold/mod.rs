//! Holding responses: what a client receives instead of the upstream's answer.

pub mod bypass;
pub mod cors;
pub mod fields;
pub mod held;
pub mod negotiate;
pub mod pages;
pub mod render;
