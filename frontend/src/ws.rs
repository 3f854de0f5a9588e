//! MQTT over WebSocket (MQTT 5.0 §6): the HTTP upgrade with the `mqtt` subprotocol, and an
//! adapter that turns the WebSocket's binary messages back into the byte stream the connection
//! handler reads, so the handler runs unchanged over TCP, TLS, WS and WSS.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use futures::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{header, HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

/// The subprotocol MQTT over WebSocket uses (MQTT 5.0 §6.0, 3.1.1 §6.0).
pub const SUBPROTOCOL: &str = "mqtt";

/// Why the upgrade was refused (already answered with an HTTP error) or failed.
#[derive(Debug)]
pub struct HandshakeError(pub String);

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn refuse(status: StatusCode, why: &str) -> ErrorResponse {
    let mut r = ErrorResponse::new(Some(format!("{why}\n")));
    *r.status_mut() = status;
    r
}

/// Decides the upgrade: the path must be `path`; the `mqtt` subprotocol is answered when
/// offered; a request offering only other subprotocols is refused (400); a request offering
/// none is accepted (lenient towards clients that omit the header).
#[allow(clippy::result_large_err)] // the shape tungstenite's callback wants
pub fn check_upgrade(
    path: &str,
    req: &Request,
    mut resp: Response,
) -> Result<Response, ErrorResponse> {
    if req.uri().path() != path {
        return Err(refuse(StatusCode::NOT_FOUND, "no MQTT endpoint here"));
    }
    let offered: Vec<&str> = req
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    if offered.contains(&SUBPROTOCOL) {
        resp.headers_mut().insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(SUBPROTOCOL),
        );
    } else if !offered.is_empty() {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "the WebSocket subprotocol must be `mqtt`",
        ));
    }
    Ok(resp)
}

/// Performs the upgrade on `stream` (plain or TLS) and returns the MQTT byte stream.
/// `max_message` bounds a single WebSocket frame and message.
#[allow(clippy::result_large_err)] // the callback's shape is tungstenite's
pub async fn accept<S>(stream: S, path: &str, max_message: usize) -> Result<WsIo<S>, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let config = WebSocketConfig::default()
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message));
    let ws = tokio_tungstenite::accept_hdr_async_with_config(
        stream,
        |req: &Request, resp: Response| check_upgrade(path, req, resp),
        Some(config),
    )
    .await
    .map_err(|e| HandshakeError(e.to_string()))?;
    Ok(WsIo::new(ws))
}

/// A WebSocket as `AsyncRead + AsyncWrite`: binary messages in and out carry the MQTT bytes
/// (a message may hold part of a packet or several). Text messages are a protocol error
/// (MQTT 5.0 §6.0: the connection is closed). Pings are answered by tungstenite.
pub struct WsIo<S> {
    ws: WebSocketStream<S>,
    pending: Bytes,
    eof: bool,
}

impl<S> WsIo<S> {
    pub fn new(ws: WebSocketStream<S>) -> WsIo<S> {
        WsIo {
            ws,
            pending: Bytes::new(),
            eof: false,
        }
    }

    pub fn get_ref(&self) -> &WebSocketStream<S> {
        &self.ws
    }
}

fn to_io(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        WsError::ConnectionClosed | WsError::AlreadyClosed => {
            io::Error::new(io::ErrorKind::BrokenPipe, "WebSocket closed")
        }
        other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(data))) => this.pending = data,
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "text WebSocket message (MQTT needs binary)",
                    )))
                }
                Some(Ok(Message::Close(_))) | None => this.eof = true,
                Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => this.eof = true,
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let ws = &mut self.ws;
        ready!(Pin::new(&mut *ws).poll_ready(cx)).map_err(to_io)?;
        Pin::new(&mut *ws)
            .start_send(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(to_io)?;
        // Like a socket, a write goes out without an explicit flush (a writer that never
        // flushes would otherwise leave the frame in tungstenite's buffer). If the socket is
        // not ready, the frame stays buffered for the next write or flush; an error shows
        // there too.
        let _ = Pin::new(&mut *ws).poll_flush(cx);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.ws).poll_flush(cx).map_err(to_io)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match ready!(Pin::new(&mut self.ws).poll_close(cx)) {
            Ok(()) | Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(to_io(e))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(path: &str, protocols: Option<&str>) -> Request {
        let mut b = Request::builder().uri(path);
        if let Some(p) = protocols {
            b = b.header(header::SEC_WEBSOCKET_PROTOCOL, p);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn upgrade_checks_path_and_subprotocol() {
        let ok = check_upgrade("/mqtt", &req("/mqtt", Some("mqtt")), Response::new(())).unwrap();
        assert_eq!(ok.headers()[header::SEC_WEBSOCKET_PROTOCOL], "mqtt");
        let ok = check_upgrade("/mqtt", &req("/mqtt", Some("foo, mqtt")), Response::new(()));
        assert!(ok.is_ok());
        let none = check_upgrade("/mqtt", &req("/mqtt", None), Response::new(())).unwrap();
        assert!(none.headers().get(header::SEC_WEBSOCKET_PROTOCOL).is_none());
        let other = check_upgrade("/mqtt", &req("/mqtt", Some("chat")), Response::new(()));
        assert_eq!(other.unwrap_err().status(), StatusCode::BAD_REQUEST);
        let wrong = check_upgrade("/mqtt", &req("/other", Some("mqtt")), Response::new(()));
        assert_eq!(wrong.unwrap_err().status(), StatusCode::NOT_FOUND);
    }
}
