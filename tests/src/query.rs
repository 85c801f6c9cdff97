//! A client for qlogd's query plane, speaking it as `rpc/src/query.rs` describes.
//!
//! Owns one-shot queries ([`query_events`], [`query_vms`]) and following
//! ([`Follower`]). It checks the framing and the reply's shape, because a test of the sink
//! should fail on a malformed reply, but not what the records say.

use std::io::Write;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use qlog_rpc::message::{decode_json, encode_json, MessageError};
use qlog_rpc::query::{
    Done, EventsQuery, Lagged, Record, Request, StatsQuery, StatsReply, VmsReply,
};
use qlog_rpc::{ErrorFrame, Frame, FrameType, Limits};

use crate::wire::{FrameReader, ReadError};
use crate::IO_TIMEOUT;

/// Why a query did not produce its reply.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("cannot connect to qlogd's query socket {path}: {source}")]
    Connect { path: PathBuf, source: std::io::Error },
    #[error("cannot send the query: {0}")]
    Send(std::io::Error),
    #[error(transparent)]
    Read(#[from] ReadError),
    /// qlogd answered with an `Error` frame.
    #[error("qlogd refused the query: {0:?}")]
    Refused(ErrorFrame),
    #[error("qlogd closed the connection before the reply was complete")]
    Closed,
    #[error("unexpected {ty:?} frame in the reply to {request}")]
    UnexpectedFrame { ty: FrameType, request: &'static str },
    #[error("bad record payload: {0}")]
    BadRecord(String),
    #[error(transparent)]
    BadJson(#[from] MessageError),
}

impl QueryError {
    /// The sink's error frame, if that is what this is.
    pub fn refusal(&self) -> Option<&ErrorFrame> {
        match self {
            QueryError::Refused(frame) => Some(frame),
            _ => None,
        }
    }
}

/// The whole answer to a non-follow events query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventsReply {
    pub records: Vec<Record>,
    /// What the sink's `Done` frame said.
    pub matched: u64,
}

/// Runs a non-follow events query and returns the records in the order sent.
///
/// # Panics
///
/// If `query.follow` is set: use [`Follower`] for that.
pub fn query_events(socket: &Path, query: &EventsQuery) -> Result<Vec<Record>, QueryError> {
    query_events_reply(socket, query).map(|reply| reply.records)
}

/// Like [`query_events`], but also returns the count from the `Done` frame.
pub fn query_events_reply(socket: &Path, query: &EventsQuery) -> Result<EventsReply, QueryError> {
    assert!(!query.follow, "query_events cannot follow; use Follower");
    let mut reader = send_request(socket, &Request::Events(query.clone()))?;
    let mut records = Vec::new();
    loop {
        let frame = reader.next_frame()?.ok_or(QueryError::Closed)?;
        match frame.ty {
            FrameType::Record => records.push(decode_record(&frame.payload)?),
            FrameType::Done => {
                let done: Done = decode_json(frame.ty, &frame.payload)?;
                return Ok(EventsReply { records, matched: done.matched });
            }
            FrameType::Error => return Err(QueryError::Refused(decode_error(&frame)?)),
            ty => return Err(QueryError::UnexpectedFrame { ty, request: "an events query" }),
        }
    }
}

/// Asks for the per-VM table.
pub fn query_vms(socket: &Path) -> Result<VmsReply, QueryError> {
    let mut reader = send_request(socket, &Request::Vms)?;
    let frame = reader.next_frame()?.ok_or(QueryError::Closed)?;
    match frame.ty {
        FrameType::Reply => Ok(decode_json(frame.ty, &frame.payload)?),
        FrameType::Error => Err(QueryError::Refused(decode_error(&frame)?)),
        ty => Err(QueryError::UnexpectedFrame { ty, request: "a vms query" }),
    }
}

/// Asks for rollups; one reply per VM.
pub fn query_stats(socket: &Path, query: &StatsQuery) -> Result<Vec<StatsReply>, QueryError> {
    let mut reader = send_request(socket, &Request::Stats(query.clone()))?;
    let mut replies = Vec::new();
    loop {
        let frame = reader.next_frame()?.ok_or(QueryError::Closed)?;
        match frame.ty {
            FrameType::Reply => replies.push(decode_json(frame.ty, &frame.payload)?),
            FrameType::Done => return Ok(replies),
            FrameType::Error => return Err(QueryError::Refused(decode_error(&frame)?)),
            ty => return Err(QueryError::UnexpectedFrame { ty, request: "a stats query" }),
        }
    }
}

/// What a follow connection delivered, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FollowItem {
    Record(Record),
    /// The stored part is complete; what follows is live.
    Done(Done),
    Lagged(Lagged),
    /// The sink ended the follow with an error frame.
    Refused(ErrorFrame),
    /// The sink closed the connection.
    Closed,
    /// The connection broke or the sink sent something malformed.
    Failed(String),
}

/// A follow query running on its own connection, with a reader thread turning frames
/// into [`FollowItem`]s. Dropping it hangs up, which ends the thread.
#[derive(Debug)]
pub struct Follower {
    items: Receiver<FollowItem>,
    /// A second handle on the connection, used only to hang up.
    hangup: UnixStream,
    reader: Option<JoinHandle<()>>,
    done: Option<Done>,
    lagged: Vec<Lagged>,
    /// Set once the connection has ended, with how.
    ended: Option<FollowItem>,
}

impl Follower {
    /// Sends `query` with `follow` set and starts reading the reply.
    pub fn start(socket: &Path, query: EventsQuery) -> Result<Follower, QueryError> {
        let query = EventsQuery { follow: true, ..query };
        let mut reader = send_request(socket, &Request::Events(query))?;
        // The reader thread blocks for as long as the test wants to follow.
        reader.get_ref().set_read_timeout(None).map_err(QueryError::Send)?;
        let hangup = reader.get_ref().try_clone().map_err(QueryError::Send)?;
        let (tx, items) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("qlog-tests-follower".to_owned())
            .spawn(move || loop {
                let item = match reader.next_frame() {
                    Ok(None) => FollowItem::Closed,
                    Err(e) if e.is_reset() => FollowItem::Closed,
                    Err(e) => FollowItem::Failed(e.to_string()),
                    Ok(Some(frame)) => follow_item(&frame),
                };
                let last = matches!(
                    item,
                    FollowItem::Closed | FollowItem::Failed(_) | FollowItem::Refused(_)
                );
                if tx.send(item).is_err() || last {
                    return;
                }
            })
            .expect("a thread can be spawned");
        Ok(Follower {
            items,
            hangup,
            reader: Some(thread),
            done: None,
            lagged: Vec::new(),
            ended: None,
        })
    }

    /// The next item as it arrived, or `None` if nothing came within `timeout`. Once the
    /// follow has ended, every call returns how it ended.
    pub fn recv(&mut self, timeout: Duration) -> Option<FollowItem> {
        if let Some(ended) = &self.ended {
            return Some(ended.clone());
        }
        let item = match self.items.recv_timeout(timeout) {
            Ok(item) => item,
            Err(RecvTimeoutError::Timeout) => return None,
            Err(RecvTimeoutError::Disconnected) => FollowItem::Failed("reader ended".into()),
        };
        match &item {
            FollowItem::Done(done) => self.done = Some(done.clone()),
            FollowItem::Lagged(lagged) => self.lagged.push(lagged.clone()),
            FollowItem::Record(_) => {}
            ended => self.ended = Some(ended.clone()),
        }
        Some(item)
    }

    /// Waits for the `Done` frame and returns the stored records that came before it.
    ///
    /// # Panics
    ///
    /// If `Done` does not arrive within `timeout` or the follow ends first.
    pub fn wait_done(&mut self, timeout: Duration) -> Vec<Record> {
        let deadline = Instant::now() + timeout;
        let mut stored = Vec::new();
        while self.done.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left) {
                Some(FollowItem::Record(record)) => stored.push(record),
                Some(FollowItem::Done(_) | FollowItem::Lagged(_)) => {}
                Some(ended) => panic!("the follow ended before Done: {ended:?}"),
                None => panic!("no Done frame within {timeout:?}"),
            }
        }
        stored
    }

    /// The next record, passing over `Done` and `Lagged` frames (which are remembered).
    ///
    /// # Panics
    ///
    /// If none arrives within `timeout` or the follow ends.
    pub fn next_record(&mut self, timeout: Duration) -> Record {
        match self.try_next_record(timeout) {
            Some(record) => record,
            None => panic!("no record within {timeout:?} (lagged so far: {:?})", self.lagged),
        }
    }

    /// The next record, or `None` if none arrives within `timeout`.
    ///
    /// # Panics
    ///
    /// If the follow ends: a test expecting that should use [`Follower::recv`].
    pub fn try_next_record(&mut self, timeout: Duration) -> Option<Record> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left)? {
                FollowItem::Record(record) => return Some(record),
                FollowItem::Done(_) | FollowItem::Lagged(_) => {}
                ended => panic!("the follow ended while waiting for a record: {ended:?}"),
            }
        }
    }

    /// `count` records in arrival order.
    pub fn next_records(&mut self, count: usize, timeout: Duration) -> Vec<Record> {
        let deadline = Instant::now() + timeout;
        (0..count)
            .map(|i| {
                let left = deadline.saturating_duration_since(Instant::now());
                self.try_next_record(left).unwrap_or_else(|| {
                    panic!("only {i} of {count} records arrived within {timeout:?}")
                })
            })
            .collect()
    }

    /// The `Done` frame, once it has been received.
    pub fn done(&self) -> Option<&Done> {
        self.done.as_ref()
    }

    /// Every `Lagged` frame received so far.
    pub fn lagged(&self) -> &[Lagged] {
        &self.lagged
    }

    /// The total of `missed` over the `Lagged` frames received so far.
    pub fn lagged_missed(&self) -> u64 {
        self.lagged.iter().map(|l| l.missed).sum()
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        // Shutting the socket down wakes the reader thread's blocking read with EOF.
        let _ = self.hangup.shutdown(Shutdown::Both);
        if let Some(thread) = self.reader.take() {
            let _ = thread.join();
        }
    }
}

fn follow_item(frame: &Frame) -> FollowItem {
    let parsed = match frame.ty {
        FrameType::Record => decode_record(&frame.payload).map(FollowItem::Record),
        FrameType::Done => {
            decode_json(frame.ty, &frame.payload).map(FollowItem::Done).map_err(QueryError::from)
        }
        FrameType::Lagged => {
            decode_json(frame.ty, &frame.payload).map(FollowItem::Lagged).map_err(QueryError::from)
        }
        FrameType::Error => decode_error(frame).map(FollowItem::Refused),
        ty => Err(QueryError::UnexpectedFrame { ty, request: "a follow query" }),
    };
    parsed.unwrap_or_else(|e| FollowItem::Failed(e.to_string()))
}

/// Connects, sends one `Query` frame and returns a reader with [`IO_TIMEOUT`] set.
fn send_request(socket: &Path, request: &Request) -> Result<FrameReader<UnixStream>, QueryError> {
    let connect_error = |source| QueryError::Connect { path: socket.to_owned(), source };
    let mut stream = UnixStream::connect(socket).map_err(connect_error)?;
    stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(QueryError::Send)?;
    stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(QueryError::Send)?;
    stream.write_all(&encode_json(FrameType::Query, request)).map_err(QueryError::Send)?;
    Ok(FrameReader::new(stream))
}

/// Decodes a `Record` payload, which must hold exactly one record.
fn decode_record(payload: &[u8]) -> Result<Record, QueryError> {
    let (record, used) = Record::decode(payload, &Limits::DEFAULT)
        .map_err(|e| QueryError::BadRecord(e.to_string()))?;
    if used != payload.len() {
        let extra = payload.len() - used;
        return Err(QueryError::BadRecord(format!("{extra} bytes follow the record")));
    }
    Ok(record)
}

fn decode_error(frame: &Frame) -> Result<ErrorFrame, QueryError> {
    Ok(decode_json(frame.ty, &frame.payload)?)
}
