//! The CLI's side of the query plane: connect, send one request, read frames.
//!
//! Connection failures become messages that say what to do: qlogd not running, or the
//! socket's group the operator is missing.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use qlog_rpc::frame::{encode_to_vec, Frame, FrameDecoder, FrameType};
use qlog_rpc::message::decode_json;
use qlog_rpc::query::{Record, RecordView, Request, StatsQuery, StatsReply, VmsReply};
use qlog_rpc::{ErrorCode, ErrorFrame, Limits};

pub struct Client {
    stream: UnixStream,
    decoder: FrameDecoder,
}

/// How much one read from qlogd may take. A tail of 100 events is some 60 KB, which
/// this reads in two; the decoder's buffer holds about this much plus one frame.
const READ_CHUNK: usize = 32 * 1024;

/// What a query stream yields.
pub enum Reply {
    Record(Received),
    /// The stored part is complete.
    Done,
    /// A follower missed this many events.
    Lagged(u64),
}

/// A record as qlogd sent it, kept in its encoding: printing reads it in place, so the
/// CLI allocates nothing per field. Reading it checks that it is one whole record whose
/// field names follow journald's rules, as [`Record::decode`] checks them; it is read
/// once, so that is one parse a record.
pub struct Received(Vec<u8>);

impl Received {
    /// The record read in place, or why it cannot be trusted to be one.
    pub fn view(&self) -> anyhow::Result<RecordView<'_>> {
        let view = RecordView::parse(&self.0).context("qlogd sent a malformed record")?;
        if view.bytes.len() != self.0.len() {
            bail!(
                "qlogd sent a malformed record: {} bytes after it",
                self.0.len() - view.bytes.len()
            );
        }
        view.validate_names(Limits::DEFAULT.max_name_len)
            .context("qlogd sent a record with a malformed field name")?;
        Ok(view)
    }

    /// The owned form, for readers that change records.
    pub fn to_record(&self) -> anyhow::Result<Record> {
        Ok(self.view()?.to_record())
    }
}

/// An error frame from qlogd, kept typed so callers can react to the code.
#[derive(Debug)]
pub struct SinkError(pub ErrorFrame);

impl std::fmt::Display for SinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "qlogd refused the query: {}", self.0.message)
    }
}

impl std::error::Error for SinkError {}

impl Client {
    pub fn connect(path: &Path) -> anyhow::Result<Client> {
        let stream = UnixStream::connect(path).map_err(|e| connect_error(path, e))?;
        Ok(Client { stream, decoder: FrameDecoder::new(Limits::DEFAULT) })
    }

    /// A second handle on the connection, e.g. to shut it down from another thread.
    pub fn try_clone_stream(&self) -> anyhow::Result<UnixStream> {
        self.stream.try_clone().context("cannot duplicate the connection to qlogd")
    }

    pub fn send(&mut self, request: &Request) -> anyhow::Result<()> {
        let payload = serde_json::to_vec(request).expect("requests serialise");
        self.stream
            .write_all(&encode_to_vec(FrameType::Query, &payload))
            .context("cannot send the query to qlogd")
    }

    fn next_frame(&mut self) -> anyhow::Result<Option<Frame>> {
        loop {
            if let Some(frame) =
                self.decoder.next_frame().context("qlogd sent a malformed frame")?
            {
                return Ok(Some(frame));
            }
            let n = match self.decoder.read_from(&mut self.stream, READ_CHUNK) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("lost the connection to qlogd"),
            };
            if n == 0 {
                self.decoder.finish().context("qlogd closed the connection mid-frame")?;
                return Ok(None);
            }
        }
    }

    /// Reads the next reply of an events query; `None` when qlogd closed the stream.
    pub fn next_reply(&mut self) -> anyhow::Result<Option<Reply>> {
        let Some(frame) = self.next_frame()? else { return Ok(None) };
        match frame.ty {
            FrameType::Record => Ok(Some(Reply::Record(Received(frame.payload)))),
            FrameType::Done => Ok(Some(Reply::Done)),
            FrameType::Lagged => {
                let lagged: qlog_rpc::query::Lagged = decode_json(frame.ty, &frame.payload)?;
                Ok(Some(Reply::Lagged(lagged.missed)))
            }
            FrameType::Error => Err(sink_error(&frame)),
            other => bail!("qlogd sent an unexpected {other:?} frame"),
        }
    }

    pub fn vms(path: &Path) -> anyhow::Result<VmsReply> {
        let mut client = Client::connect(path)?;
        client.send(&Request::Vms)?;
        match client.next_frame()? {
            Some(f) if f.ty == FrameType::Reply => Ok(decode_json(f.ty, &f.payload)?),
            Some(f) if f.ty == FrameType::Error => Err(sink_error(&f)),
            Some(f) => bail!("qlogd sent an unexpected {:?} frame", f.ty),
            None => bail!("qlogd closed the connection without a reply"),
        }
    }

    /// Every VM's rollups for a stats request, one reply per VM.
    pub fn stats(path: &Path, query: StatsQuery) -> anyhow::Result<Vec<StatsReply>> {
        let mut client = Client::connect(path)?;
        client.send(&Request::Stats(query))?;
        let mut replies = Vec::new();
        loop {
            match client.next_frame()? {
                Some(f) if f.ty == FrameType::Reply => replies.push(decode_json(f.ty, &f.payload)?),
                Some(f) if f.ty == FrameType::Done => return Ok(replies),
                Some(f) if f.ty == FrameType::Error => return Err(sink_error(&f)),
                Some(f) => bail!("qlogd sent an unexpected {:?} frame", f.ty),
                None => bail!("qlogd closed the connection before the stats were complete"),
            }
        }
    }
}

impl Client {
    /// Has qlogd check (or, with `heads_only`, just report) VMs' hash chains.
    pub fn verify(
        path: &Path,
        query: &qlog_rpc::query::VerifyQuery,
    ) -> anyhow::Result<qlog_rpc::query::VerifyReply> {
        let mut client = Client::connect(path)?;
        client.send(&Request::Verify(query.clone()))?;
        match client.next_frame()? {
            Some(f) if f.ty == FrameType::Reply => Ok(decode_json(f.ty, &f.payload)?),
            Some(f) if f.ty == FrameType::Error => Err(sink_error(&f)),
            Some(f) => bail!("qlogd sent an unexpected {:?} frame", f.ty),
            None => bail!("qlogd closed the connection before verifying (was it stopped?)"),
        }
    }
}

fn sink_error(frame: &Frame) -> anyhow::Error {
    match decode_json::<ErrorFrame>(frame.ty, &frame.payload) {
        Ok(e) => anyhow::Error::new(SinkError(e)),
        Err(e) => anyhow!("qlogd sent an unreadable error: {e}"),
    }
}

/// True if the error is qlogd saying a VM is unknown.
pub fn is_unknown_vm(e: &anyhow::Error) -> bool {
    e.downcast_ref::<SinkError>().is_some_and(|s| s.0.code == ErrorCode::UnknownVm)
}

fn connect_error(path: &Path, e: std::io::Error) -> anyhow::Error {
    use std::io::ErrorKind::*;
    match e.kind() {
        NotFound | ConnectionRefused => anyhow!(
            "cannot reach qlogd at {} (is qlogd running? set QLOG_QUERY_SOCKET or --socket to its query socket)",
            path.display()
        ),
        PermissionDenied => match socket_group(path) {
            Some(group) => anyhow!(
                "permission denied on {}: only members of group {group} may query (add yourself with `sudo adduser $USER {group}` and log in again)",
                path.display()
            ),
            // The socket cannot even be looked at: a directory on the way is closed.
            None => anyhow!(
                "permission denied on {}: a directory on the way to it is closed to you (ask the log qube's administrator, who can check with `ls -ld` on each directory)",
                path.display()
            ),
        },
        _ => anyhow!("cannot connect to qlogd at {}: {e}", path.display()),
    }
}

/// The name of the socket's group, or `gid N` if it has none; `None` if the socket
/// cannot be looked at.
fn socket_group(path: &Path) -> Option<String> {
    let gid = std::fs::metadata(path).ok()?.gid();
    let groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
    let name = groups.lines().find_map(|line| {
        let mut parts = line.split(':');
        let name = parts.next()?;
        (parts.nth(1)?.parse::<u32>().ok()? == gid).then(|| name.to_owned())
    });
    Some(name.unwrap_or_else(|| format!("gid {gid}")))
}

/// The query socket from `--socket` or `QLOG_QUERY_SOCKET`, else the production path.
pub fn default_socket() -> PathBuf {
    PathBuf::from("/run/qlog/query.sock")
}
