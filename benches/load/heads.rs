//! The bare relays' head handling and command line (`bare_relay.rs` and `uring_relay/`): one
//! file, so that the two relays compared with each other parse and write heads exactly alike.

use std::net::SocketAddr;

/// `LISTEN_ADDR UPSTREAM_ADDR` from the command line; exits 2 with a usage line otherwise.
pub fn addresses(program: &str) -> (SocketAddr, SocketAddr) {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let addrs: Option<(SocketAddr, SocketAddr)> = match args.as_slice() {
        [listen, upstream] => listen.parse().ok().zip(upstream.parse().ok()),
        _ => None,
    };
    addrs.unwrap_or_else(|| {
        eprintln!(
            "usage: {program} LISTEN_ADDR UPSTREAM_ADDR (e.g. 127.0.0.1:8081 127.0.0.1:8080)"
        );
        std::process::exit(2)
    })
}

/// Why a connection ends: the relays only need it to end.
pub struct Closed;

/// The upstream request for a whole head at the start of `buf`, into `out`; the head's length.
/// `None` while the head is incomplete.
pub fn request_head(buf: &[u8], out: &mut Vec<u8>) -> Result<Option<usize>, Closed> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Request::new(&mut headers);
    let used = match parsed.parse(buf).map_err(|_| Closed)? {
        httparse::Status::Complete(used) => used,
        httparse::Status::Partial => return Ok(None),
    };
    let (Some(method @ "GET"), Some(path)) = (parsed.method, parsed.path) else {
        return Err(Closed);
    };
    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for h in parsed.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") && h.value != b"0"
            || h.name.eq_ignore_ascii_case("transfer-encoding")
        {
            return Err(Closed);
        }
        if h.name.eq_ignore_ascii_case("connection") {
            continue;
        }
        push_header(out, h.name, h.value);
    }
    // What every proxy tells its upstream.
    out.extend_from_slice(b"X-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\n\r\n");
    Ok(Some(used))
}

/// The client's response head for a whole upstream head at the start of `buf`, into `out`;
/// the head's length and the body's. `None` while the head is incomplete.
pub fn response_head(buf: &[u8], out: &mut Vec<u8>) -> Result<Option<(usize, usize)>, Closed> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Response::new(&mut headers);
    let used = match parsed.parse(buf).map_err(|_| Closed)? {
        httparse::Status::Complete(used) => used,
        httparse::Status::Partial => return Ok(None),
    };
    let code = parsed.code.ok_or(Closed)?;
    out.clear();
    if !(200..1000).contains(&code) {
        return Err(Closed);
    }
    let digits = [
        b'0' + (code / 100) as u8,
        b'0' + (code / 10 % 10) as u8,
        b'0' + (code % 10) as u8,
    ];
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(&digits);
    out.push(b' ');
    out.extend_from_slice(parsed.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut length = None;
    for h in parsed.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(Closed);
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            let text = std::str::from_utf8(h.value).map_err(|_| Closed)?;
            length = Some(text.trim().parse::<usize>().map_err(|_| Closed)?);
        }
        if h.name.eq_ignore_ascii_case("connection") {
            continue;
        }
        push_header(out, h.name, h.value);
    }
    out.extend_from_slice(b"\r\n");
    let length = match code {
        204 | 304 => 0,
        _ => length.ok_or(Closed)?,
    };
    Ok(Some((used, length)))
}

fn push_header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}
