//! A command's stdin, stdout and stderr, served on threads of their own with blocking waits,
//! the way the client serves its own stdin and stdout (`app::shell`). The session's thread
//! is then left to open, seal and move records: on two CPUs the pipe copies and the
//! command's wake-ups run beside it instead of queueing behind it (bench/README, session 12).
//!
//! Each thread waits in poll(2) on its (non-blocking) descriptor and on a stop pipe. The
//! async side holds the stop pipe's write end; when it is dropped (the channel ended, the
//! peer left) the thread stops waiting, even for a command that neither reads nor writes
//! any more.

use super::bulk::RecordReads;
use super::router::ChannelSender;
use crate::core::service::{Msg, Stream};
use crate::core::session::Payload;
use crate::net::tcp::MAX_WRITE_SLICES;
use rustix::event::{PollFd, PollFlags};
use rustix::io::Errno;
use rustix::pipe::PipeFlags;
use std::io::{self, IoSlice};
use std::ops::Range;
use std::os::fd::{AsFd, OwnedFd};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

/// Stdin work for the command's writer, in channel order.
pub enum Job {
    /// Write these ranges of `buf`, then give `consume` bytes of window back.
    Data {
        buf: Payload,
        ranges: Vec<Range<usize>>,
        consume: usize,
    },
    Eof,
}

/// The thread's end of a stop pipe.
struct Stop(OwnedFd);

impl Stop {
    /// Waits until `fd` is ready for `events` (or has failed: the next call says how).
    /// False once the async side has let go.
    fn ready(&self, fd: &impl AsFd, events: PollFlags) -> bool {
        loop {
            let mut fds = [PollFd::new(fd, events), PollFd::new(&self.0, PollFlags::IN)];
            match rustix::event::poll(&mut fds, None) {
                Ok(_) if !fds[1].revents().is_empty() => return false,
                Ok(_) if !fds[0].revents().is_empty() => return true,
                Ok(_) | Err(Errno::INTR) => {}
                Err(e) => {
                    debug!("poll: {e}");
                    return false;
                }
            }
        }
    }
}

/// `fd` in non-blocking mode (tokio hands a child's pipes out blocking), so that waits
/// happen in [`Stop::ready`].
fn nonblocking(fd: OwnedFd) -> Option<OwnedFd> {
    match rustix::io::ioctl_fionbio(&fd, true) {
        Ok(()) => Some(fd),
        Err(e) => {
            warn!("cannot make the command's pipe non-blocking, so it is not served: {e}");
            None
        }
    }
}

/// Runs `work` on a thread named `name` and returns what it returns. Dropping the future
/// stops the thread's waits.
async fn on_thread<T: Send + 'static>(
    name: &str,
    work: impl FnOnce(Stop) -> T + Send + 'static,
) -> io::Result<T> {
    // Close-on-exec: a command started later must not hold the write end open.
    let (stop_rd, stop_wr) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC)?;
    let (done_tx, done_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let _ = done_tx.send(work(Stop(stop_rd)));
        })?;
    let done = done_rx.await;
    drop(stop_wr);
    done.map_err(|_| io::Error::other(format!("thread {name} panicked")))
}

/// Writes the peer's stdin to the command (`fd`) until the jobs end. Bytes
/// the command no longer takes (it closed its stdin) are dropped, as sshd does, and their
/// window is still given back. EOF closes `fd` only if `close_on_eof` (not on a terminal,
/// where there is nothing to close: sshd does the same).
pub async fn write_stdin(
    fd: Option<OwnedFd>,
    close_on_eof: bool,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    tx: ChannelSender,
) {
    let work = move |stop: Stop| {
        let mut sink = fd.and_then(nonblocking);
        while let Some(job) = jobs.blocking_recv() {
            match job {
                Job::Data {
                    buf,
                    ranges,
                    consume,
                } => {
                    if let Some(fd) = &sink {
                        if let Err(e) = write_ranges(fd, &buf, &ranges, &stop) {
                            debug!("command stopped taking input: {e}");
                            sink = None;
                        }
                    }
                    tx.consumed_buffer(consume, buf);
                }
                Job::Eof if close_on_eof => sink = None,
                Job::Eof => {}
            }
        }
    };
    if let Err(e) = on_thread("qssh-cmd-stdin", work).await {
        warn!("command's stdin: {e}");
    }
}

/// Writes `ranges` of `buf` to the non-blocking `fd` in order: the stdin messages of one
/// received batch reach the command in one vectored write ([`MAX_WRITE_SLICES`] ranges at
/// most) when the pipe has room.
fn write_ranges(fd: &OwnedFd, buf: &[u8], ranges: &[Range<usize>], stop: &Stop) -> io::Result<()> {
    let mut slices: Vec<IoSlice> = ranges
        .iter()
        .filter(|r| !r.is_empty())
        .map(|r| IoSlice::new(&buf[r.clone()]))
        .collect();
    let mut left = &mut slices[..];
    while !left.is_empty() {
        let batch = &left[..left.len().min(MAX_WRITE_SLICES)];
        match rustix::io::writev(fd, batch) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut left, n),
            Err(Errno::AGAIN) => {
                if !stop.ready(fd, PollFlags::OUT) {
                    return Err(io::Error::other("stopped"));
                }
            }
            Err(Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Sends one output stream of the command (`fd`) until its end, then EOF for
/// it. The pipe is read straight into records ([`RecordReads`]). `Err` if the channel is
/// gone.
pub async fn send_output(fd: Option<OwnedFd>, stream: Stream, tx: ChannelSender) -> Result<(), ()> {
    let rt = tokio::runtime::Handle::current();
    let name = match stream {
        Stream::Stderr => "qssh-cmd-stderr",
        _ => "qssh-cmd-stdout",
    };
    let work = move |stop: Stop| {
        if let Some(fd) = fd.and_then(nonblocking) {
            let mut reads = RecordReads::new(stream);
            loop {
                match rustix::io::readv(&fd, &mut reads.slices()) {
                    Ok(0) => break,
                    Ok(n) => match rt.block_on(tx.send_records(reads.filled(n))) {
                        Ok(back) => reads.refill(back),
                        Err(_) => return Err(()),
                    },
                    Err(Errno::AGAIN) => {
                        if !stop.ready(&fd, PollFlags::IN) {
                            return Err(());
                        }
                    }
                    Err(Errno::INTR) => {}
                    Err(e) => {
                        debug!("reading {stream:?}: {e}");
                        break;
                    }
                }
            }
        }
        rt.block_on(tx.send(Msg::Eof(stream).to_vec()))
            .map(drop)
            .map_err(drop)
    };
    on_thread(name, work).await.unwrap_or_else(|e| {
        warn!("command's {stream:?}: {e}");
        Err(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn nonblocking_pipe(size: usize) -> (OwnedFd, OwnedFd) {
        let (rd, wr) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC).unwrap();
        rustix::io::ioctl_fionbio(&wr, true).unwrap();
        rustix::pipe::fcntl_setpipe_size(&wr, size).unwrap();
        (rd, wr)
    }

    fn stop_pair() -> (Stop, OwnedFd) {
        let (rd, wr) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC).unwrap();
        (Stop(rd), wr)
    }

    #[test]
    fn stdin_ranges_arrive_in_order_through_a_full_pipe() {
        // 3000 ranges of 1..=97 bytes with 3-byte gaps (message headers) between them,
        // through a one-page pipe: many partial and refused (EAGAIN) vectored writes.
        let buf: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut ranges = Vec::new();
        let mut at = 0;
        for i in 0..3000 {
            let len = if i % 500 == 0 { 0 } else { 1 + i % 97 };
            ranges.push(at..at + len);
            at += len + 3;
        }
        let want: Vec<u8> = ranges
            .iter()
            .flat_map(|r| buf[r.clone()].to_vec())
            .collect();
        let (rd, wr) = nonblocking_pipe(4096);
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut chunk = [0u8; 1000];
            loop {
                match rustix::io::read(&rd, &mut chunk) {
                    Ok(0) => return got,
                    Ok(n) => got.extend_from_slice(&chunk[..n]),
                    Err(e) => panic!("read: {e}"),
                }
            }
        });
        let (stop, _keep) = stop_pair();
        write_ranges(&wr, &buf, &ranges, &stop).unwrap();
        drop(wr);
        assert_eq!(reader.join().unwrap(), want);
    }

    #[test]
    fn a_blocked_writer_stops_when_the_async_side_lets_go() {
        // Nobody reads: the pipe fills and the writer waits, until the stop pipe's write
        // end is dropped.
        let (rd, wr) = nonblocking_pipe(4096);
        let (stop, release) = stop_pair();
        let buf = vec![7u8; 100_000];
        let halves = [0..50_000, 50_000..buf.len()];
        let writer = std::thread::spawn(move || write_ranges(&wr, &buf, &halves, &stop));
        // The pipe is full once the writer has written all it can (waiting at most 10 s
        // for a slow scheduler); it cannot have finished then, the rest does not fit.
        let deadline = Instant::now() + Duration::from_secs(10);
        while rustix::io::ioctl_fionread(&rd).unwrap() < 4096 {
            assert!(
                Instant::now() < deadline,
                "the writer never filled the pipe"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !writer.is_finished(),
            "the writer should wait on the full pipe"
        );
        drop(release);
        assert!(
            writer.join().unwrap().is_err(),
            "a stopped write reports it"
        );
    }

    #[test]
    fn a_waiting_reader_stops_when_the_async_side_lets_go() {
        // The command keeps its output open and writes nothing.
        let (rd, _wr) = nonblocking_pipe(4096);
        let (stop, release) = stop_pair();
        let waiter = std::thread::spawn(move || stop.ready(&rd, PollFlags::IN));
        std::thread::sleep(Duration::from_millis(100));
        assert!(!waiter.is_finished(), "the reader should wait for output");
        drop(release);
        assert!(!waiter.join().unwrap(), "stopped, not ready");
    }

    #[test]
    fn a_reader_wakes_for_output_and_for_the_end() {
        let (rd, wr) = nonblocking_pipe(4096);
        let (stop, _keep) = stop_pair();
        rustix::io::write(&wr, b"x").unwrap();
        assert!(stop.ready(&rd, PollFlags::IN));
        let mut b = [0u8; 4];
        assert_eq!(rustix::io::read(&rd, &mut b).unwrap(), 1);
        drop(wr);
        assert!(stop.ready(&rd, PollFlags::IN), "a hang-up is ready too");
        assert_eq!(rustix::io::read(&rd, &mut b).unwrap(), 0);
    }
}
