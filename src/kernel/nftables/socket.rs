//! A `NETLINK_NETFILTER` socket: sends a batch and reads its acknowledgements, or dumps objects.
//!
//! Every exchange has a deadline: the socket's receive timeout bounds each read, and a whole
//! exchange gives up at [`TIMEOUT`] — or at the caller's deadline, if that comes first — however
//! the kernel's answers trickle in.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::time::{Duration, Instant};

use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_netfilter::nftables::NfTablesMessage;
use netlink_packet_netfilter::{NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily};
use netlink_sys::{Socket, protocols::NETLINK_NETFILTER};
use thiserror::Error;

use super::encode::Batch;
use crate::core::redirect::Family;
use crate::kernel::deadline::Deadline;

/// How long one exchange with the kernel may take (it answers in microseconds).
pub const TIMEOUT: Duration = Duration::from_secs(2);

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// The size of the buffer answers are read into.
const RECV_BUF: usize = 64 * 1024;
/// Batches larger than this raise the socket's send buffer (a batch is one datagram).
const DEFAULT_SNDBUF: usize = 128 * 1024;

#[derive(Debug, Error)]
pub enum SocketError {
    #[error("cannot {what}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    /// `allowed`: [`TIMEOUT`], or the caller's budget when its deadline came first.
    #[error("the kernel did not answer within {} ms while trying to {what}", allowed.as_millis())]
    Timeout { what: &'static str, allowed: Duration },
    #[error("the kernel refused {what}")]
    Refused {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot {what}: malformed netlink answer")]
    Malformed { what: &'static str },
}

/// A netfilter netlink socket, bound to the namespace it was created in.
pub struct NfSocket {
    sock: Socket,
    seq: u32,
    /// No exchange goes on past this.
    deadline: Option<Deadline>,
    /// Where answers are read into: one buffer for the socket's life, made at its first read.
    buf: Vec<u8>,
}

impl NfSocket {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> Result<NfSocket, SocketError> {
        let sock = Socket::new(NETLINK_NETFILTER)
            .map_err(|source| SocketError::Io { what: "open a netfilter netlink socket", source })?;
        NfSocket::set_up(sock)
    }

    /// Makes a socket of a descriptor from `socket(AF_NETLINK, SOCK_RAW, NETLINK_NETFILTER)`
    /// (made in another namespace, see [`crate::kernel::netns::Netns::socket`]), whose exchanges
    /// also end by `deadline`.
    pub fn from_fd(fd: OwnedFd, deadline: Deadline) -> Result<NfSocket, SocketError> {
        // Safety: `fd` is an open netlink socket owned by nothing else; the Socket takes it over.
        let sock = unsafe { Socket::from_raw_fd(fd.into_raw_fd()) };
        let mut s = NfSocket::set_up(sock)?;
        s.deadline = Some(deadline);
        Ok(s)
    }

    /// Unbound and unconnected: the kernel binds it at its first send, and an unconnected
    /// netlink socket talks to the kernel. Each read sets its own timeout.
    fn set_up(sock: Socket) -> Result<NfSocket, SocketError> {
        // Acknowledgements of errors carry only the header of the refused message, not all of it.
        sock.set_cap_ack(true)
            .map_err(|source| SocketError::Io { what: "configure a netfilter netlink socket", source })?;
        let seq = std::process::id().wrapping_mul(1000);
        Ok(NfSocket { sock, seq, deadline: None, buf: Vec::new() })
    }

    /// The sequence number to start a batch after (the batch takes numbers after it).
    pub fn next_seq(&self) -> u32 {
        self.seq
    }

    /// Sends `bytes`, the bytes of `batch` (ended or not, see [`Batch::end_bytes`]), and waits
    /// for the kernel's answers: a refusal for each message it refused, then the acknowledgement
    /// of the last message. The first refusal is returned, naming the refused element.
    pub fn send(&mut self, batch: &Batch, bytes: &[u8]) -> Result<(), SocketError> {
        const WHAT: &str = "send an nf_tables batch";
        self.seq = batch.last_seq() + 2;
        if bytes.len() > DEFAULT_SNDBUF {
            raise_sndbuf(&self.sock, bytes.len()).map_err(|source| SocketError::Io { what: WHAT, source })?;
        }
        self.sock.send(bytes, 0).map_err(|source| SocketError::Io { what: WHAT, source })?;
        let deadline = self.exchange_deadline();
        let mut refused: Option<(u32, i32)> = None;
        loop {
            let buf = self.recv(deadline, WHAT)?;
            for (kind, seq, payload) in messages(buf).ok_or(SocketError::Malformed { what: WHAT })? {
                if kind != NLMSG_ERROR {
                    continue;
                }
                let errno = errno(payload).ok_or(SocketError::Malformed { what: WHAT })?;
                if errno != 0 && refused.is_none() {
                    refused = Some((seq, errno));
                }
                // The last message's answer is the last one; an error about the batch itself
                // (its begin message) means no answers follow.
                if seq == batch.last_seq() || (seq == batch.first_seq && errno != 0) {
                    return match refused {
                        None => Ok(()),
                        Some((seq, errno)) => Err(SocketError::Refused {
                            what: batch.describe(seq).to_owned(),
                            source: io::Error::from_raw_os_error(errno),
                        }),
                    };
                }
            }
        }
    }

    /// Dumps every object a `Get…` message asks for (`family` filters by family).
    pub fn dump(
        &mut self,
        family: NetfilterProtoFamily,
        request: NfTablesMessage,
        what: &'static str,
    ) -> Result<Vec<(Option<Family>, NfTablesMessage)>, SocketError> {
        self.seq += 1;
        let seq = self.seq;
        let mut m = NetlinkMessage::from(NetfilterMessage::new(NetfilterHeader::new(family, 0, 0), request));
        m.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        m.header.sequence_number = seq;
        m.finalize();
        let mut bytes = vec![0u8; m.buffer_len()];
        m.serialize(&mut bytes);
        self.sock.send(&bytes, 0).map_err(|source| SocketError::Io { what, source })?;
        let deadline = self.exchange_deadline();
        let mut out = Vec::new();
        loop {
            let buf = self.recv(deadline, what)?;
            let mut at = 0;
            for (kind, s, payload) in messages(buf).ok_or(SocketError::Malformed { what })? {
                let len = NLMSG_HDRLEN + payload.len();
                let whole = &buf[at..at + len];
                at += (len + 3) & !3;
                if s != seq {
                    continue;
                }
                match kind {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let errno = errno(payload).ok_or(SocketError::Malformed { what })?;
                        return Err(SocketError::Io { what, source: io::Error::from_raw_os_error(errno) });
                    }
                    _ => {
                        let msg = NetlinkMessage::<NetfilterMessage>::deserialize(whole)
                            .map_err(|_| SocketError::Malformed { what })?;
                        if let NetlinkPayload::InnerMessage(NetfilterMessage {
                            header,
                            inner: NetfilterMessageInner::NfTables(m),
                            ..
                        }) = msg.payload
                        {
                            let family = match header.family {
                                NetfilterProtoFamily::IPv4 => Some(Family::V4),
                                NetfilterProtoFamily::IPv6 => Some(Family::V6),
                                _ => None,
                            };
                            out.push((family, m));
                        }
                    }
                }
            }
        }
    }

    /// When the exchange starting now must end, and the limit that sets it, for the message of a
    /// timeout: [`TIMEOUT`], or the caller's budget when its deadline comes first.
    fn exchange_deadline(&self) -> (Instant, Duration) {
        match self.deadline {
            Some(d) if d.remaining() < TIMEOUT => (Instant::now() + d.remaining(), d.budget()),
            _ => (Instant::now() + TIMEOUT, TIMEOUT),
        }
    }

    /// Reads one datagram; its bytes.
    fn recv(&mut self, (deadline, allowed): (Instant, Duration), what: &'static str) -> Result<&[u8], SocketError> {
        if self.buf.is_empty() {
            // Larger than any one message the kernel sends (a dump's part is at most 32 KiB).
            self.buf = vec![0u8; RECV_BUF];
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(SocketError::Timeout { what, allowed });
            }
            // A read blocks no longer than what is left of the exchange.
            set_timeout(&self.sock, left).map_err(|source| SocketError::Io { what, source })?;
            match self.sock.recv(&mut &mut self.buf[..], 0) {
                Ok(n) => return Ok(&self.buf[..n]),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                    return Err(SocketError::Timeout { what, allowed });
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(SocketError::Io { what, source }),
            }
        }
    }
}

/// Bounds each read of `sock` by `timeout` (at least a microsecond: zero would mean "forever").
fn set_timeout(sock: &Socket, timeout: Duration) -> io::Result<()> {
    socket2::SockRef::from(sock).set_read_timeout(Some(timeout.max(Duration::from_micros(1))))
}

/// Lets one datagram of `len` bytes through (`SO_SNDBUFFORCE`: we are root, as `nft` does).
fn raise_sndbuf(sock: &Socket, len: usize) -> io::Result<()> {
    let size = libc::c_int::try_from(len + 4096).unwrap_or(libc::c_int::MAX);
    // Safety: `size` is a valid int and its size is passed along; the descriptor is open.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Splits a datagram into (type, sequence number, payload), or `None` if a length is inconsistent.
fn messages(mut buf: &[u8]) -> Option<Vec<(u16, u32, &[u8])>> {
    let mut out = Vec::new();
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(buf[..4].try_into().ok()?) as usize;
        let kind = u16::from_ne_bytes(buf[4..6].try_into().ok()?);
        let seq = u32::from_ne_bytes(buf[8..12].try_into().ok()?);
        if len < NLMSG_HDRLEN || len > buf.len() {
            return None;
        }
        out.push((kind, seq, &buf[NLMSG_HDRLEN..len]));
        buf = &buf[((len + 3) & !3).min(buf.len())..];
    }
    Some(out)
}

/// The errno of an `NLMSG_ERROR` payload (0: an acknowledgement of success), as a positive number.
fn errno(payload: &[u8]) -> Option<i32> {
    payload.get(..4).and_then(|b| b.try_into().ok()).map(|b| -i32::from_ne_bytes(b))
}
