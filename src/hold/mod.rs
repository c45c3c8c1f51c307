//! Holding responses: what a client receives instead of the upstream's answer.

pub mod bypass;
pub mod negotiate;
pub mod render;
