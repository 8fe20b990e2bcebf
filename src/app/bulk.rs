//! Bulk stream data read straight into record buffers: one vectored read fills the data
//! areas of up to [`RECORDS_PER_READ`] records behind a message header, and the session seals
//! each where it lies ([`Session::send_records`](crate::core::session::Session::send_records)),
//! so nothing is copied between the read and the cipher (docs/ARCHITECTURE.md).

use crate::core::limits::MAX_FRAME_DATA;
use crate::core::service::{data_header, Stream, MSG_HEADER};
use crate::core::session::{new_record_buffer, DATA_RECORD_HEAD};
use std::io::IoSliceMut;

/// Records one read fills at most: with its message header a full read is exactly this many
/// full frames (fewer, larger messages: each costs a driver round trip).
pub const RECORDS_PER_READ: usize = 4;
/// Most bytes of a stream one read takes.
pub const BULK_READ_CHUNK: usize = RECORDS_PER_READ * MAX_FRAME_DATA - MSG_HEADER;

/// The record buffers of one read of one stream, reused read after read.
pub struct RecordReads {
    stream: Stream,
    recs: Vec<Vec<u8>>,
}

impl RecordReads {
    pub fn new(stream: Stream) -> Self {
        RecordReads {
            stream,
            recs: (0..RECORDS_PER_READ).map(|_| new_record_buffer()).collect(),
        }
    }

    /// Where the next read goes: the buffers' data areas in order, the first after room for
    /// the message header ([`BULK_READ_CHUNK`] bytes in all).
    pub fn slices(&mut self) -> Vec<IoSliceMut<'_>> {
        self.recs
            .iter_mut()
            .enumerate()
            .map(|(i, rec)| {
                // Buffers from the session have this length already (no bytes are written).
                rec.resize(DATA_RECORD_HEAD + MAX_FRAME_DATA, 0);
                let start = DATA_RECORD_HEAD + if i == 0 { MSG_HEADER } else { 0 };
                IoSliceMut::new(&mut rec[start..DATA_RECORD_HEAD + MAX_FRAME_DATA])
            })
            .collect()
    }

    /// `n` bytes (1..=[`BULK_READ_CHUNK`]) were read into [`RecordReads::slices`]: the
    /// records holding them, as one data message of the stream, for `send_records`. Give
    /// the buffers that come back to [`RecordReads::refill`].
    pub fn filled(&mut self, n: usize) -> Vec<Vec<u8>> {
        assert!(
            (1..=BULK_READ_CHUNK).contains(&n),
            "read outside the slices"
        );
        let mut left = MSG_HEADER + n;
        let used = left.div_ceil(MAX_FRAME_DATA);
        let mut out: Vec<Vec<u8>> = self.recs.drain(..used).collect();
        for rec in &mut out {
            let len = left.min(MAX_FRAME_DATA);
            rec.truncate(DATA_RECORD_HEAD + len);
            left -= len;
        }
        out[0][DATA_RECORD_HEAD..DATA_RECORD_HEAD + MSG_HEADER]
            .copy_from_slice(&data_header(self.stream, n));
        out
    }

    /// Buffers for the next read, as the session handed them back.
    pub fn refill(&mut self, back: Vec<Vec<u8>>) {
        self.recs.extend(back);
        self.recs.truncate(RECORDS_PER_READ);
        while self.recs.len() < RECORDS_PER_READ {
            self.recs.push(new_record_buffer());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::service::{MsgDecoder, Piece};

    /// What the peer gets from the records' data areas, in order.
    fn stream_of(recs: &[Vec<u8>]) -> Vec<u8> {
        recs.iter()
            .flat_map(|r| r[DATA_RECORD_HEAD..].iter().copied())
            .collect()
    }

    fn read(reads: &mut RecordReads, data: &[u8]) -> Vec<Vec<u8>> {
        let mut at = 0;
        for mut s in reads.slices() {
            let n = s.len().min(data.len() - at);
            s[..n].copy_from_slice(&data[at..at + n]);
            at += n;
        }
        reads.filled(data.len())
    }

    #[test]
    fn reads_of_every_size_become_one_message_in_full_records() {
        let mut reads = RecordReads::new(Stream::Stdout);
        for n in [
            1,
            MAX_FRAME_DATA - MSG_HEADER - 1,
            MAX_FRAME_DATA - MSG_HEADER,
            MAX_FRAME_DATA - MSG_HEADER + 1,
            2 * MAX_FRAME_DATA,
            BULK_READ_CHUNK,
        ] {
            let data: Vec<u8> = (0..n).map(|i| (i * 7 + n) as u8).collect();
            let recs = read(&mut reads, &data);
            // Every record but the last is full, so they stay MAX_FRAME_DATA apart.
            assert_eq!(
                recs.len(),
                (MSG_HEADER + n).div_ceil(MAX_FRAME_DATA),
                "n = {n}"
            );
            for r in &recs[..recs.len() - 1] {
                assert_eq!(r.len(), DATA_RECORD_HEAD + MAX_FRAME_DATA);
            }
            let bytes = stream_of(&recs);
            let mut got = Vec::new();
            for piece in MsgDecoder::default().split(&bytes).expect("valid message") {
                match piece {
                    Piece::Data(Stream::Stdout, r) => got.extend_from_slice(&bytes[r]),
                    other => panic!("unexpected {other:?}"),
                }
            }
            assert_eq!(got, data, "n = {n}");
            reads.refill(recs);
            assert_eq!(reads.recs.len(), RECORDS_PER_READ);
        }
    }
}
