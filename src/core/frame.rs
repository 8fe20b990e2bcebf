//! Frames: the plaintext inside ratchet records. One record carries one or more frames; every
//! frame is self-delimiting and every length in it is bounded by a named limit.
//!
//! Channels multiplex chat, shell, exec, forwarding and VPN control over one session. Channel
//! ids are chosen by the side that opens the channel: even ids by the initiator, odd ids by
//! the responder, so both sides can open channels at once without a collision.

use super::codec::{DecodeError, Reader, Writer};
use super::limits::{MAX_CHANNEL_PARAMS, MAX_FRAME_DATA};

/// Channel types. A peer may only open a type the other side allows (the app decides).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ChannelKind {
    /// Message-oriented: each DATA frame is one chat message.
    Chat = 1,
    Shell = 2,
    Exec = 3,
    /// Local forward (-L): the opener asks the peer to connect to host:port.
    ForwardTcp = 4,
    /// Remote forward (-R) control and its accepted connections.
    ReverseForward = 5,
    Vpn = 6,
}

impl ChannelKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        use ChannelKind::*;
        [Chat, Shell, Exec, ForwardTcp, ReverseForward, Vpn]
            .into_iter()
            .find(|k| *k as u8 == v)
    }
}

/// Why a channel or session was closed or refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CloseCode {
    Normal = 0,
    /// The peer's policy does not allow this (authorization).
    Refused = 1,
    /// Unknown channel kind or malformed parameters.
    Unsupported = 2,
    /// Resource limits (too many channels, buffers).
    Limit = 3,
    /// The peer violated the protocol; the session ends.
    Protocol = 4,
    /// The process is shutting down.
    Shutdown = 5,
    /// Any other error; the reason text says more.
    Error = 6,
}

impl CloseCode {
    pub fn from_u8(v: u8) -> Self {
        use CloseCode::*;
        [Normal, Refused, Unsupported, Limit, Protocol, Shutdown]
            .into_iter()
            .find(|k| *k as u8 == v)
            .unwrap_or(Error)
    }
}

/// One frame. Borrowed data points into the decrypted record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    Open {
        ch: u32,
        kind: u8,
        window: u32,
        params: &'a [u8],
    },
    OpenOk {
        ch: u32,
        window: u32,
    },
    OpenFail {
        ch: u32,
        code: CloseCode,
        reason: &'a [u8],
    },
    Data {
        ch: u32,
        data: &'a [u8],
    },
    Window {
        ch: u32,
        increment: u32,
    },
    Eof {
        ch: u32,
    },
    Close {
        ch: u32,
        code: CloseCode,
        reason: &'a [u8],
    },
    Ping {
        opaque: u64,
    },
    Pong {
        opaque: u64,
    },
    SessionClose {
        code: CloseCode,
        reason: &'a [u8],
    },
    /// A new datagram epoch secret for the sender's direction (see core::datagram).
    DatagramEpoch {
        epoch: u32,
        secret: [u8; 32],
    },
    /// The receiver installed the sender's datagram epoch `epoch`: the sender may now seal
    /// under it (step 4 of the rotation in core::datagram).
    DatagramEpochOk {
        epoch: u32,
    },
}

const T_OPEN: u8 = 1;
const T_OPEN_OK: u8 = 2;
const T_OPEN_FAIL: u8 = 3;
const T_DATA: u8 = 4;
const T_WINDOW: u8 = 5;
const T_EOF: u8 = 6;
const T_CLOSE: u8 = 7;
const T_PING: u8 = 8;
const T_PONG: u8 = 9;
const T_SESSION_CLOSE: u8 = 10;
const T_DATAGRAM_EPOCH: u8 = 11;
const T_DATAGRAM_EPOCH_OK: u8 = 12;

impl<'a> Frame<'a> {
    /// Encodes the frame. Callers keep data and reasons within the limits; reasons are
    /// truncated to MAX_CHANNEL_PARAMS here so that an error string can never break encoding.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut w = Writer::new(out);
        let clip = |b: &'a [u8]| &b[..b.len().min(MAX_CHANNEL_PARAMS)];
        match *self {
            Frame::Open {
                ch,
                kind,
                window,
                params,
            } => {
                w.u8(T_OPEN).u32(ch).u8(kind).u32(window).vec16(params);
            }
            Frame::OpenOk { ch, window } => {
                w.u8(T_OPEN_OK).u32(ch).u32(window);
            }
            Frame::OpenFail { ch, code, reason } => {
                w.u8(T_OPEN_FAIL).u32(ch).u8(code as u8).vec16(clip(reason));
            }
            Frame::Data { ch, data } => {
                w.u8(T_DATA).u32(ch).vec16(data);
            }
            Frame::Window { ch, increment } => {
                w.u8(T_WINDOW).u32(ch).u32(increment);
            }
            Frame::Eof { ch } => {
                w.u8(T_EOF).u32(ch);
            }
            Frame::Close { ch, code, reason } => {
                w.u8(T_CLOSE).u32(ch).u8(code as u8).vec16(clip(reason));
            }
            Frame::Ping { opaque } => {
                w.u8(T_PING).u64(opaque);
            }
            Frame::Pong { opaque } => {
                w.u8(T_PONG).u64(opaque);
            }
            Frame::SessionClose { code, reason } => {
                w.u8(T_SESSION_CLOSE).u8(code as u8).vec16(clip(reason));
            }
            Frame::DatagramEpoch { epoch, secret } => {
                w.u8(T_DATAGRAM_EPOCH).u32(epoch).bytes(&secret);
            }
            Frame::DatagramEpochOk { epoch } => {
                w.u8(T_DATAGRAM_EPOCH_OK).u32(epoch);
            }
        }
    }

    /// Bytes [`Frame::encode`] appends for this frame.
    pub fn encoded_len(&self) -> usize {
        let clip = |b: &[u8]| b.len().min(MAX_CHANNEL_PARAMS);
        match *self {
            Frame::Open { params, .. } => 1 + 4 + 1 + 4 + 2 + clip(params),
            Frame::OpenOk { .. } | Frame::Window { .. } => 1 + 4 + 4,
            Frame::OpenFail { reason, .. } | Frame::Close { reason, .. } => {
                1 + 4 + 1 + 2 + clip(reason)
            }
            Frame::Data { data, .. } => Self::DATA_OVERHEAD + data.len(),
            Frame::Eof { .. } | Frame::DatagramEpochOk { .. } => 1 + 4,
            Frame::Ping { .. } | Frame::Pong { .. } => 1 + 8,
            Frame::SessionClose { reason, .. } => 1 + 1 + 2 + clip(reason),
            Frame::DatagramEpoch { .. } => 1 + 4 + 32,
        }
    }

    /// Encoded size of a DATA frame header (type, channel, length).
    pub const DATA_OVERHEAD: usize = 1 + 4 + 2;

    /// Writes the header [`Frame::encode`] puts in front of `len` bytes of DATA on `ch` into
    /// `out` (exactly `DATA_OVERHEAD` bytes), for data already in place after it. `len` must
    /// fit a frame (at most `MAX_FRAME_DATA`).
    pub fn write_data_header(ch: u32, len: usize, out: &mut [u8]) {
        let len = u16::try_from(len).expect("DATA longer than a frame");
        out[0] = T_DATA;
        out[1..5].copy_from_slice(&ch.to_be_bytes());
        out[5..Self::DATA_OVERHEAD].copy_from_slice(&len.to_be_bytes());
    }

    /// Decodes one frame from the reader.
    pub fn decode(r: &mut Reader<'a>) -> Result<Self, DecodeError> {
        Ok(match r.u8()? {
            T_OPEN => Frame::Open {
                ch: r.u32()?,
                kind: r.u8()?,
                window: r.u32()?,
                params: r.vec16(MAX_CHANNEL_PARAMS)?,
            },
            T_OPEN_OK => Frame::OpenOk {
                ch: r.u32()?,
                window: r.u32()?,
            },
            T_OPEN_FAIL => Frame::OpenFail {
                ch: r.u32()?,
                code: CloseCode::from_u8(r.u8()?),
                reason: r.vec16(MAX_CHANNEL_PARAMS)?,
            },
            T_DATA => Frame::Data {
                ch: r.u32()?,
                data: r.vec16(MAX_FRAME_DATA)?,
            },
            T_WINDOW => Frame::Window {
                ch: r.u32()?,
                increment: r.u32()?,
            },
            T_EOF => Frame::Eof { ch: r.u32()? },
            T_CLOSE => Frame::Close {
                ch: r.u32()?,
                code: CloseCode::from_u8(r.u8()?),
                reason: r.vec16(MAX_CHANNEL_PARAMS)?,
            },
            T_PING => Frame::Ping { opaque: r.u64()? },
            T_PONG => Frame::Pong { opaque: r.u64()? },
            T_SESSION_CLOSE => Frame::SessionClose {
                code: CloseCode::from_u8(r.u8()?),
                reason: r.vec16(MAX_CHANNEL_PARAMS)?,
            },
            T_DATAGRAM_EPOCH => Frame::DatagramEpoch {
                epoch: r.u32()?,
                secret: r.array()?,
            },
            T_DATAGRAM_EPOCH_OK => Frame::DatagramEpochOk { epoch: r.u32()? },
            _ => return Err(DecodeError::Invalid("frame type")),
        })
    }

    /// Decodes all frames of a record payload.
    pub fn decode_all(payload: &'a [u8]) -> Result<Vec<Frame<'a>>, DecodeError> {
        let mut r = Reader::new(payload);
        let mut frames = Vec::new();
        while r.remaining() > 0 {
            frames.push(Frame::decode(&mut r)?);
        }
        Ok(frames)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn samples() -> Vec<Frame<'static>> {
        vec![
            Frame::Open {
                ch: 2,
                kind: 3,
                window: 1 << 20,
                params: b"ls -l",
            },
            Frame::OpenOk { ch: 2, window: 7 },
            Frame::OpenFail {
                ch: 4,
                code: CloseCode::Refused,
                reason: b"not authorized",
            },
            Frame::Data { ch: 1, data: b"hi" },
            Frame::Window {
                ch: 1,
                increment: 99,
            },
            Frame::Eof { ch: 1 },
            Frame::Close {
                ch: 1,
                code: CloseCode::Normal,
                reason: b"",
            },
            Frame::Ping { opaque: 5 },
            Frame::Pong { opaque: 5 },
            Frame::SessionClose {
                code: CloseCode::Shutdown,
                reason: b"bye",
            },
            Frame::DatagramEpoch {
                epoch: 3,
                secret: [9; 32],
            },
            Frame::DatagramEpochOk { epoch: 3 },
        ]
    }

    #[test]
    fn round_trip_all_frames_in_one_record() {
        let mut buf = Vec::new();
        for f in samples() {
            f.encode(&mut buf);
        }
        assert_eq!(Frame::decode_all(&buf).unwrap(), samples());
        // every strict prefix fails or decodes fewer frames, never panics
        for cut in 0..buf.len() {
            if let Ok(v) = Frame::decode_all(&buf[..cut]) {
                assert!(v.len() < samples().len());
            }
        }
    }

    #[test]
    fn encoded_len_matches_encode() {
        let long = vec![7u8; MAX_CHANNEL_PARAMS + 10];
        let mut frames = samples();
        frames.push(Frame::Close {
            ch: 1,
            code: CloseCode::Error,
            reason: &long,
        });
        frames.push(Frame::SessionClose {
            code: CloseCode::Error,
            reason: &long,
        });
        for f in frames {
            let mut buf = Vec::new();
            f.encode(&mut buf);
            assert_eq!(f.encoded_len(), buf.len(), "{f:?}");
        }
    }

    #[test]
    fn datagram_epoch_ok_is_byte_exact() {
        let mut buf = Vec::new();
        Frame::DatagramEpochOk { epoch: 0x0102_0304 }.encode(&mut buf);
        assert_eq!(buf, [12, 1, 2, 3, 4]);
        assert_eq!(
            Frame::decode_all(&buf[..4]),
            Err(DecodeError::Truncated),
            "short epoch"
        );
    }

    #[test]
    fn oversized_data_length_is_refused_before_reading() {
        let mut buf = vec![T_DATA, 0, 0, 0, 1];
        buf.extend_from_slice(&((MAX_FRAME_DATA + 1) as u16).to_be_bytes());
        assert_eq!(
            Frame::decode_all(&buf),
            Err(DecodeError::TooLong(MAX_FRAME_DATA + 1, MAX_FRAME_DATA))
        );
        assert_eq!(
            Frame::decode_all(&[0xee]),
            Err(DecodeError::Invalid("frame type"))
        );
    }

    proptest! {
        #[test]
        fn data_frames_round_trip(ch in any::<u32>(), data in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let mut buf = Vec::new();
            Frame::Data { ch, data: &data }.encode(&mut buf);
            prop_assert_eq!(buf.len(), Frame::DATA_OVERHEAD + data.len());
            let mut head = [0; Frame::DATA_OVERHEAD];
            Frame::write_data_header(ch, data.len(), &mut head);
            prop_assert_eq!(&buf[..Frame::DATA_OVERHEAD], &head[..]);
            prop_assert_eq!(Frame::decode_all(&buf).unwrap(), vec![Frame::Data { ch, data: &data }]);
        }

        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Frame::decode_all(&bytes);
        }
    }
}
