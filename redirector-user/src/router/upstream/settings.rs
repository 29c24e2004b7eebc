//! The upstream's `SETTINGS_MAX_CONCURRENT_STREAMS`, read off the wire.
//!
//! hyper's HTTP/2 client does not tell when the upstream's SETTINGS arrive: its `SendRequest`
//! is always "ready" (h2 queues streams beyond the limit), and the limit it reports before the
//! first SETTINGS is its own assumption of 100. A pool that opens another connection beyond the
//! limit must know the real one before it puts a burst of requests on a new connection, so
//! [`SettingsWatch`] follows the frames the upstream sends (a 9-byte header each, payloads
//! skipped) and publishes the limit of every SETTINGS frame. The server's first frame is always
//! SETTINGS (RFC 9113, 3.4), so the limit is known one round trip after the connection opens.
use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::watch,
};

const FRAME_HEADER: usize = 9;
const SETTINGS: u8 = 0x4;
const ACK: u8 = 0x1;
const SETTING_ENTRY: usize = 6;
const MAX_CONCURRENT_STREAMS: u16 = 0x3;

/// The upstream's stream limit: None until its first SETTINGS frame, then Some (`usize::MAX`
/// when it sets none, which means no limit).
pub type Limit = watch::Receiver<Option<usize>>;

/// An upstream socket whose incoming frames are watched for SETTINGS; bytes pass unchanged.
pub struct SettingsWatch<T> {
    io: T,
    frames: Frames,
    limit: watch::Sender<Option<usize>>,
}

impl<T> SettingsWatch<T> {
    pub fn new(io: T) -> (SettingsWatch<T>, Limit) {
        let (limit, watching) = watch::channel(None);
        let watch = SettingsWatch {
            io,
            frames: Frames::default(),
            limit,
        };
        (watch, watching)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for SettingsWatch<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let this = &mut *self;
            let limit = &this.limit;
            this.frames.feed(&buf.filled()[before..], |max| {
                limit.send_modify(|known| {
                    // A SETTINGS frame without the setting leaves it as it was.
                    *known = Some(max.map_or(known.unwrap_or(usize::MAX), |m| m as usize));
                });
            });
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for SettingsWatch<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Where the reader is in the frame stream.
#[derive(Debug)]
enum State {
    Header {
        bytes: [u8; FRAME_HEADER],
        have: usize,
    },
    Skip(usize),
    Settings {
        remaining: usize,
        entry: [u8; SETTING_ENTRY],
        have: usize,
        max: Option<u32>,
    },
}

#[derive(Debug)]
struct Frames {
    state: State,
}

impl Default for Frames {
    fn default() -> Frames {
        Frames {
            state: State::Header {
                bytes: [0; FRAME_HEADER],
                have: 0,
            },
        }
    }
}

impl Frames {
    /// Follows `data`, the next bytes from the server, calling `settings` with the
    /// MAX_CONCURRENT_STREAMS of each complete SETTINGS frame (None when it has none).
    fn feed(&mut self, mut data: &[u8], mut settings: impl FnMut(Option<u32>)) {
        while !data.is_empty() {
            match &mut self.state {
                State::Header { bytes, have } => {
                    let n = (FRAME_HEADER - *have).min(data.len());
                    bytes[*have..*have + n].copy_from_slice(&data[..n]);
                    *have += n;
                    data = &data[n..];
                    if *have == FRAME_HEADER {
                        let len = usize::from(bytes[0]) << 16
                            | usize::from(bytes[1]) << 8
                            | usize::from(bytes[2]);
                        let is_settings = bytes[3] == SETTINGS && bytes[4] & ACK == 0;
                        self.state = if is_settings {
                            State::Settings {
                                remaining: len,
                                entry: [0; SETTING_ENTRY],
                                have: 0,
                                max: None,
                            }
                        } else {
                            State::Skip(len)
                        };
                        self.end_frame(&mut settings);
                    }
                }
                State::Skip(remaining) => {
                    let n = (*remaining).min(data.len());
                    *remaining -= n;
                    data = &data[n..];
                    self.end_frame(&mut settings);
                }
                State::Settings {
                    remaining,
                    entry,
                    have,
                    max,
                } => {
                    let n = (*remaining).min(data.len()).min(SETTING_ENTRY - *have);
                    entry[*have..*have + n].copy_from_slice(&data[..n]);
                    *have += n;
                    *remaining -= n;
                    data = &data[n..];
                    if *have == SETTING_ENTRY {
                        *have = 0;
                        if u16::from_be_bytes([entry[0], entry[1]]) == MAX_CONCURRENT_STREAMS {
                            *max =
                                Some(u32::from_be_bytes([entry[2], entry[3], entry[4], entry[5]]));
                        }
                    }
                    self.end_frame(&mut settings);
                }
            }
        }
        // A frame that ends exactly here (an empty SETTINGS included) is complete already.
        self.end_frame(&mut settings);
    }

    /// Back to the next header once the current frame's payload is consumed.
    fn end_frame(&mut self, settings: &mut impl FnMut(Option<u32>)) {
        let done = match &self.state {
            State::Header { .. } => return,
            State::Skip(remaining) => *remaining == 0,
            State::Settings { remaining, max, .. } => {
                if *remaining == 0 {
                    settings(*max);
                }
                *remaining == 0
            }
        };
        if done {
            self.state = State::Header {
                bytes: [0; FRAME_HEADER],
                have: 0,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            flags,
            0,
            0,
            0,
            0,
        ];
        f.extend_from_slice(payload);
        f
    }

    fn setting(id: u16, value: u32) -> Vec<u8> {
        let mut e = id.to_be_bytes().to_vec();
        e.extend(value.to_be_bytes());
        e
    }

    fn seen(stream: &[u8], chunk: usize) -> Vec<Option<u32>> {
        let mut frames = Frames::default();
        let mut seen = Vec::new();
        for piece in stream.chunks(chunk) {
            frames.feed(piece, |max| seen.push(max));
        }
        seen
    }

    #[test]
    fn settings_are_found_between_other_frames_however_the_bytes_arrive() {
        let mut stream = frame(
            SETTINGS,
            0,
            &[setting(0x4, 65_535), setting(0x3, 4)].concat(),
        );
        stream.extend(frame(SETTINGS, ACK, &[]));
        stream.extend(frame(0x0, 0, &[7; 40]));
        // An ACK carrying the setting id must not count; nor must DATA that looks like it.
        stream.extend(frame(0x0, 0, &setting(0x3, 1)));
        stream.extend(frame(SETTINGS, 0, &[]));
        stream.extend(frame(SETTINGS, 0, &setting(0x3, 250)));
        for chunk in [1, 2, 5, 9, 13, stream.len()] {
            assert_eq!(
                seen(&stream, chunk),
                [Some(4), None, Some(250)],
                "in chunks of {chunk}"
            );
        }
    }

    #[tokio::test]
    async fn the_limit_is_published_as_it_arrives() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let (mut server, client) = tokio::io::duplex(64);
        let (mut watch, limit) = SettingsWatch::new(client);
        assert_eq!(*limit.borrow(), None);
        server
            .write_all(&frame(SETTINGS, 0, &setting(0x3, 7)))
            .await
            .expect("write");
        let mut buf = [0u8; 64];
        let n = watch.read(&mut buf).await.expect("read");
        assert_eq!(n, FRAME_HEADER + SETTING_ENTRY, "bytes pass unchanged");
        assert_eq!(*limit.borrow(), Some(7));
        server
            .write_all(&frame(SETTINGS, 0, &[]))
            .await
            .expect("write");
        let _ = watch.read(&mut buf).await.expect("read");
        assert_eq!(*limit.borrow(), Some(7), "unchanged by a frame without it");
    }
}
