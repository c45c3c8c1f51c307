//! Read access to a request's header lines, from hyper's `HeaderMap` or straight from the
//! lines httparse found, so that the rules that judge a request (bypass, negotiation) read
//! either without the lines being copied into a map first.
//!
//! `fast` answers held requests from httparse's lines: building a `HeaderMap` there (a name
//! lookup, a value and a hash per line, and an allocation to free) cost a third of the
//! user-space work of a held request.

use http::header::{ACCEPT, ACCEPT_LANGUAGE, CONTENT_TYPE, UPGRADE};
use http::{HeaderMap, HeaderName, HeaderValue};

/// A request's header lines, by name.
pub trait Fields {
    /// The values of every line named `name`, in the order they came.
    fn all<'a>(&'a self, name: &'a HeaderName) -> impl DoubleEndedIterator<Item = &'a [u8]> + 'a;

    /// The first line's value.
    fn value<'a>(&'a self, name: &'a HeaderName) -> Option<&'a [u8]> {
        self.all(name).next()
    }

    /// What content negotiation reads of every held request (`negotiate::negotiate`).
    fn negotiated(&self) -> Negotiated<'_> {
        let mut accepts = self.all(&ACCEPT);
        let accept = accepts.next();
        Negotiated {
            accept,
            accepts_more: accepts.next().is_some(),
            accept_language: self.value(&ACCEPT_LANGUAGE),
            content_type: self.value(&CONTENT_TYPE),
            upgrade: self.value(&UPGRADE),
        }
    }
}

/// The lines that choose a held request's form and language, as `Fields::value` finds them.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Negotiated<'a> {
    /// The first `Accept`; `accepts_more`: whether another follows.
    pub accept: Option<&'a [u8]>,
    pub accepts_more: bool,
    pub accept_language: Option<&'a [u8]>,
    pub content_type: Option<&'a [u8]>,
    pub upgrade: Option<&'a [u8]>,
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

    /// One walk over the lines for the four names, where `value` would make one per name: a
    /// held request took four (a tenth of its cost). A name is compared only with the one
    /// of its length.
    fn negotiated(&self) -> Negotiated<'_> {
        let mut seen = Negotiated::default();
        for line in self {
            let is = |known: &HeaderName| line.name.eq_ignore_ascii_case(known.as_str());
            let slot = match line.name.len() {
                6 if is(&ACCEPT) => {
                    if seen.accept.is_some() {
                        seen.accepts_more = true;
                        continue;
                    }
                    &mut seen.accept
                }
                7 if is(&UPGRADE) => &mut seen.upgrade,
                12 if is(&CONTENT_TYPE) => &mut seen.content_type,
                15 if is(&ACCEPT_LANGUAGE) => &mut seen.accept_language,
                _ => continue,
            };
            if slot.is_none() {
                *slot = Some(line.value);
            }
        }
        seen
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
    use http::header::COOKIE;
    use http::header::HOST;

    /// The lines hyper's path would hold, as a map.
    fn as_map(parsed: &[httparse::Header<'_>]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for line in parsed {
            let name = HeaderName::from_bytes(line.name.as_bytes()).unwrap();
            map.append(name, HeaderValue::from_bytes(line.value).unwrap());
        }
        map
    }

    #[test]
    fn both_sources_give_the_same_lines() {
        let head =
            b"GET / HTTP/1.1\r\nHost: a\r\ncookie: x=1\r\nACCEPT: text/html\r\nCookie: y=2\r\n\r\n";
        let mut lines = [httparse::EMPTY_HEADER; 8];
        let mut req = httparse::Request::new(&mut lines);
        assert!(req.parse(head).is_ok_and(|s| s.is_complete()));
        let parsed: &[httparse::Header<'_>] = req.headers;
        let map = as_map(parsed);
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
    fn one_walk_finds_what_negotiation_reads_as_a_map_does() {
        let heads: [&[u8]; 5] = [
            b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nAccept: text/html\r\nAccept-Encoding: gzip\r\n\r\n",
            b"GET / HTTP/1.1\r\naccept-language: fr\r\nACCEPT: a/b\r\nUpgrade: websocket\r\n\
              Content-Type: application/grpc\r\naccept: c/d\r\nAccept-Language: de\r\n\
              upgrade: h2c\r\ncontent-type: x/y\r\nAccept: e/f\r\n\r\n",
            b"GET / HTTP/1.1\r\nAccepts: x\r\nUpgrades: y\r\nContent-Types: z\r\n\
              Accept-Languages: w\r\nAccept: \r\n\r\n",
            b"GET / HTTP/1.1\r\nX-Accept-Lang: fr\r\ncontent-tyPE: a/b\r\nUPGRADE: u\r\n\r\n",
        ];
        for head in heads {
            let mut lines = [httparse::EMPTY_HEADER; 16];
            let mut req = httparse::Request::new(&mut lines);
            assert!(req.parse(head).is_ok_and(|s| s.is_complete()));
            let parsed: &[httparse::Header<'_>] = req.headers;
            let map = as_map(parsed);
            let from_lines = parsed.negotiated();
            assert_eq!(from_lines, map.negotiated(), "{}", head.escape_ascii());
            // The trait's own reading, which the map uses, is the one the walk replaces.
            let by_name = Negotiated {
                accept: parsed.value(&ACCEPT),
                accepts_more: parsed.all(&ACCEPT).nth(1).is_some(),
                accept_language: parsed.value(&ACCEPT_LANGUAGE),
                content_type: parsed.value(&CONTENT_TYPE),
                upgrade: parsed.value(&UPGRADE),
            };
            assert_eq!(from_lines, by_name, "{}", head.escape_ascii());
        }
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
