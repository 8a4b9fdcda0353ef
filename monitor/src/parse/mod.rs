//! Protocol parsers. Each works on one direction of one connection, is fed bytes in order,
//! and is bounded in memory: a parser never buffers more than its limit.

pub mod http1;

/// A header as parsed: lower-cased name, raw value. Values may hold secrets: they live only
/// until credentials are extracted and are zeroed when dropped.
pub struct Header {
    pub name: String,
    pub value: zeroize::Zeroizing<Vec<u8>>,
}

impl Header {
    pub fn new(name: &str, value: &[u8]) -> Self {
        Header {
            name: name.to_ascii_lowercase(),
            value: zeroize::Zeroizing::new(value.to_vec()),
        }
    }
}

impl std::fmt::Debug for Header {
    // Never print values: they are credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: <{} bytes>", self.name, self.value.len())
    }
}

/// One HTTP request, whatever the protocol version.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// `Host` (HTTP/1) or `:authority` (HTTP/2).
    pub host: Option<String>,
    pub version: &'static str,
    pub headers: Vec<Header>,
}

#[derive(Debug)]
pub enum Message {
    Request(Request),
    Response { status: u16 },
}
