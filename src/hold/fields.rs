//! Read access to a request's header lines, from hyper's `HeaderMap` or straight from the
//! lines httparse found, so that the rules that judge a request (bypass, negotiation) read
//! either without the lines being copied into a map first.
//!
//! `fast` answers held requests from httparse's lines: building a `HeaderMap` there (a name
//! lookup, a value and a hash per line, and an allocation to free) cost a third of the
//! user-space work of a held request.

use http::{HeaderMap, HeaderName, HeaderValue};

/// A request's header lines, by name.
pub trait Fields {
    /// The values of every line named `name`, in the order they came.
    fn all<'a>(&'a self, name: &'a HeaderName) -> impl DoubleEndedIterator<Item = &'a [u8]> + 'a;

    /// The first line's value.
    fn value<'a>(&'a self, name: &'a HeaderName) -> Option<&'a [u8]> {
        self.all(name).next()
    }
}

impl Fields for HeaderMap {
    fn all<'a>(&'a self, name: &'a HeaderName) -> impl DoubleEndedIterator<Item = &'a [u8]> + 'a {
        self.get_all(name).iter().map(HeaderValue::as_bytes)
    }
}

/// httparse has checked the names (tokens) and the values (no control bytes but tab) as
/// `http` does, so these are the lines hyper would have put in its map, in the same order.
impl Fields for [httparse::Header<'_>] {
    fn all<'a>(&'a self, name: &'a HeaderName) -> impl DoubleEndedIterator<Item = &'a [u8]> + 'a {
        let name = name.as_str();
        self.iter()
            .filter(move |line| line.name.eq_ignore_ascii_case(name))
            .map(|line| line.value)
    }
}

/// A value as text when it is visible ASCII (tab allowed): what `HeaderValue::to_str`
/// accepts, so that both sources read the same lines as text.
pub fn text(value: &[u8]) -> Option<&str> {
    if value
        .iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
    {
        std::str::from_utf8(value).ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::{ACCEPT, COOKIE, HOST};

    #[test]
    fn both_sources_give_the_same_lines() {
        let head =
            b"GET / HTTP/1.1\r\nHost: a\r\ncookie: x=1\r\nACCEPT: text/html\r\nCookie: y=2\r\n\r\n";
        let mut lines = [httparse::EMPTY_HEADER; 8];
        let mut req = httparse::Request::new(&mut lines);
        assert!(req.parse(head).is_ok_and(|s| s.is_complete()));
        let parsed: &[httparse::Header<'_>] = req.headers;
        let mut map = HeaderMap::new();
        for line in parsed {
            let name = HeaderName::from_bytes(line.name.as_bytes()).unwrap();
            map.append(name, HeaderValue::from_bytes(line.value).unwrap());
        }
        for name in [COOKIE, ACCEPT, HOST, http::header::FORWARDED] {
            let from_lines: Vec<_> = parsed.all(&name).collect();
            let from_map: Vec<_> = map.all(&name).collect();
            assert_eq!(from_lines, from_map, "{name}");
            let rev: Vec<_> = parsed.all(&name).rev().collect();
            assert_eq!(rev, map.all(&name).rev().collect::<Vec<_>>(), "{name}");
            assert_eq!(parsed.value(&name), map.value(&name), "{name}");
        }
        assert_eq!(parsed.all(&COOKIE).count(), 2);
    }

    #[test]
    fn text_is_what_header_value_calls_text() {
        for b in 0..=255u8 {
            let bytes = [b'a', b, b'z'];
            let Ok(value) = HeaderValue::from_bytes(&bytes) else {
                continue;
            };
            assert_eq!(text(&bytes), value.to_str().ok(), "byte {b:#x}");
        }
    }
}
