//! A control-socket client: one request, one response line. Used by `ctl` and the tests.

use super::protocol::{Request, Response};
use std::path::Path;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no proxy answered on {path}: {source}")]
    NoProxy {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the control connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the proxy sent an answer that is not understood: {0}")]
    Protocol(String),
}

/// A connection that can carry many requests.
pub struct Client {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

impl Client {
    pub async fn connect(path: &Path) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| ClientError::NoProxy {
                path: path.display().to_string(),
                source,
            })?;
        let (r, w) = stream.into_split();
        Ok(Client {
            reader: BufReader::new(r),
            writer: w,
        })
    }

    /// Sends a raw line (a newline is added) and returns the raw answer line.
    pub async fn raw(&mut self, line: &[u8]) -> Result<String, ClientError> {
        self.writer.write_all(line).await?;
        self.writer.write_all(b"\n").await?;
        let mut answer = String::new();
        let n = self.reader.read_line(&mut answer).await?;
        if n == 0 {
            return Err(ClientError::Protocol(
                "the proxy closed the connection".into(),
            ));
        }
        Ok(answer)
    }

    pub async fn request(&mut self, req: &Request) -> Result<Response, ClientError> {
        let line = serde_json::to_vec(req).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let answer = self.raw(&line).await?;
        serde_json::from_str(&answer).map_err(|e| ClientError::Protocol(format!("{e}: {answer}")))
    }
}

/// Connects, sends one request, returns the response.
pub async fn request(path: &Path, req: &Request) -> Result<Response, ClientError> {
    Client::connect(path).await?.request(req).await
}
