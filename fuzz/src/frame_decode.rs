//! Target `frame_decode`: [`Frame::decode_all`] on arbitrary bytes (the plaintext of a record
//! that authenticated, i.e. anything an authenticated but hostile peer can send).

use qssh::core::frame::Frame;

/// What one input did: the number of frames decoded, or `None` when the record was refused.
pub fn run(data: &[u8]) -> Option<usize> {
    Frame::decode_all(data).ok().map(|frames| frames.len())
}

/// Seed inputs: one record of every frame type, each alone and all together.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    use qssh::core::frame::CloseCode;
    let frames = [
        Frame::Open {
            ch: 0,
            kind: 1,
            window: 1 << 20,
            params: b"",
        },
        Frame::OpenOk {
            ch: 1,
            window: 1 << 20,
        },
        Frame::OpenFail {
            ch: 3,
            code: CloseCode::Refused,
            reason: b"not authorized",
        },
        Frame::Data {
            ch: 0,
            data: b"hello\n",
        },
        Frame::Window {
            ch: 0,
            increment: 1 << 18,
        },
        Frame::Eof { ch: 0 },
        Frame::Close {
            ch: 0,
            code: CloseCode::Normal,
            reason: b"",
        },
        Frame::Ping { opaque: 7 },
        Frame::Pong { opaque: 7 },
        Frame::SessionClose {
            code: CloseCode::Shutdown,
            reason: b"bye",
        },
        Frame::DatagramEpoch {
            epoch: 1,
            secret: [0x42; 32],
        },
    ];
    let mut all = Vec::new();
    let mut out: Vec<(String, Vec<u8>)> = frames
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let mut one = Vec::new();
            f.encode(&mut one);
            all.extend_from_slice(&one);
            (format!("frame-{i:02}"), one)
        })
        .collect();
    out.push(("all-frames".to_string(), all));
    out
}
