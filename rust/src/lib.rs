//! `nebula.raft._core`: tikv's raft-rs `RawNode` behind a small, sans-I/O Python API.
//!
//! The core does no I/O and keeps no clock.  Python drives it the way raft-rs's
//! `RawNode` is meant to be driven (design.md §4):
//!
//! ```text
//! tick() / step_from(peer, bytes) / propose(ctx, data) / propose_many([data, ...])
//!   / propose_conf_change(...)      (proposals: the leader only)
//! rd = ready()                        -> the Ready as plain tuples; kept here until advance()
//!   send rd.messages                  (safe before persistence: raft-rs only puts messages
//!                                      there that do not vouch for unpersisted state)
//!   persist rd.snapshot, rd.entries, rd.hard_state and fdatasync
//!   light = advance()                 -> the in-memory log takes the persisted Ready;
//!                                      raft-rs learns it is durable (on_persist_ready)
//!   send rd.persisted_messages, light.messages
//!   apply rd.committed + light.committed in order, apply_conf_change for conf entries
//!   advance_apply()
//! ```
//!
//! The in-memory log (`Store`) mirrors what Python made durable; Python rebuilds a node
//! from its durable log at every start.  Snapshots carry opaque state-machine bytes that
//! Python produces (`compact`) and consumes (a Ready's snapshot).
//!
//! Errors: `RaftError` (and `ProposalDropped`, a subclass) for every refusal raft-rs
//! reports; a panic inside raft-rs surfaces as pyo3's `PanicException`, which the node
//! loop treats as fatal (fail closed).

// protobuf 2 messages are built field by field from Default (their cached-size and
// unknown-field members make struct literals noisy).
#![allow(clippy::field_reassign_with_default)]

use std::cmp;

mod signer;
mod syncer;
mod worker;

use protobuf::Message as PbMessage;
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::{PyBytes, PyDict};
use raft::eraftpb::{
    ConfChange, ConfChangeType, ConfState, Entry, EntryType, HardState, Message, MessageType,
    Snapshot,
};
use raft::{
    Config, Error as RaftErr, GetEntriesContext, RaftState, RawNode, SnapshotStatus, StateRole,
    Storage, StorageError,
};

create_exception!(
    _core,
    RaftError,
    PyException,
    "raft-rs refused an operation."
);
create_exception!(
    _core,
    ProposalDropped,
    RaftError,
    "The proposal was dropped (not leader, transfer in progress, ...)."
);

fn raft_err(e: RaftErr) -> PyErr {
    match e {
        RaftErr::ProposalDropped => ProposalDropped::new_err("proposal dropped"),
        other => RaftError::new_err(other.to_string()),
    }
}

// ---- the in-memory log ------------------------------------------------------------------

#[derive(Default)]
struct Store {
    hs: HardState,
    cs: ConfState,
    /// The latest snapshot (metadata index 0 when there is none).
    snap: Snapshot,
    /// `entries[i].index == snap.index + 1 + i`.
    entries: Vec<Entry>,
}

impl Store {
    fn snap_index(&self) -> u64 {
        self.snap.get_metadata().index
    }
    fn first(&self) -> u64 {
        self.snap_index() + 1
    }
    fn last(&self) -> u64 {
        self.entries.last().map_or(self.snap_index(), |e| e.index)
    }
    fn term_at(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.snap_index() {
            return Ok(self.snap.get_metadata().term);
        }
        if idx < self.first() {
            return Err(RaftErr::Store(StorageError::Compacted));
        }
        if idx > self.last() {
            return Err(RaftErr::Store(StorageError::Unavailable));
        }
        Ok(self.entries[(idx - self.first()) as usize].term)
    }
    fn append(&mut self, ents: Vec<Entry>) -> PyResult<()> {
        let Some(head) = ents.first() else {
            return Ok(());
        };
        let first = head.index;
        if first < self.first() {
            return Err(RaftError::new_err(format!(
                "append at {first} below the first index {}",
                self.first()
            )));
        }
        if first > self.last() + 1 {
            return Err(RaftError::new_err(format!(
                "append at {first} leaves a gap after {}",
                self.last()
            )));
        }
        self.entries.truncate((first - self.first()) as usize);
        self.entries.extend(ents);
        Ok(())
    }
    fn apply_snapshot(&mut self, snap: Snapshot) {
        let m = snap.get_metadata();
        self.hs.term = cmp::max(self.hs.term, m.term);
        self.hs.commit = cmp::max(self.hs.commit, m.index);
        self.cs = m.get_conf_state().clone();
        self.entries.clear();
        self.snap = snap;
    }
}

impl Storage for Store {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(self.hs.clone(), self.cs.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(RaftErr::Store(StorageError::Compacted));
        }
        if high > self.last() + 1 || low > high {
            return Err(RaftErr::Store(StorageError::Unavailable));
        }
        let lo = (low - self.first()) as usize;
        let hi = (high - self.first()) as usize;
        let mut ents = self.entries[lo..hi].to_vec();
        raft::util::limit_size(&mut ents, max_size.into());
        Ok(ents)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.term_at(idx)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        if self.snap_index() == 0 || self.snap_index() < request_index {
            return Err(RaftErr::Store(StorageError::SnapshotTemporarilyUnavailable));
        }
        Ok(self.snap.clone())
    }
}

// ---- conversions ------------------------------------------------------------------------

type PyEntry<'py> = (u64, u64, i32, Bound<'py, PyBytes>, Bound<'py, PyBytes>);
type InEntry = (u64, u64, i32, PyBackedBytes, PyBackedBytes);
type PySnap<'py> = (u64, u64, Vec<u64>, Vec<u64>, Bound<'py, PyBytes>);
type InSnap = (u64, u64, Vec<u64>, Vec<u64>, PyBackedBytes);
/// (change, node_id, context, voters, learners) of an applied conf change.
type PyConfChange<'py> = (i32, u64, Bound<'py, PyBytes>, Vec<u64>, Vec<u64>);

fn entry_out<'py>(py: Python<'py>, e: &Entry) -> PyEntry<'py> {
    (
        e.index,
        e.term,
        e.get_entry_type() as i32,
        PyBytes::new(py, &e.data),
        PyBytes::new(py, &e.context),
    )
}

fn entry_in(t: InEntry) -> PyResult<Entry> {
    let (index, term, kind, data, context) = t;
    let mut e = Entry::default();
    e.index = index;
    e.term = term;
    e.set_entry_type(match kind {
        0 => EntryType::EntryNormal,
        1 => EntryType::EntryConfChange,
        2 => EntryType::EntryConfChangeV2,
        k => return Err(PyValueError::new_err(format!("unknown entry type {k}"))),
    });
    e.data = data.to_vec().into();
    e.context = context.to_vec().into();
    Ok(e)
}

fn snap_in(t: InSnap) -> Snapshot {
    let (index, term, voters, learners, data) = t;
    let mut s = Snapshot::default();
    s.data = data.to_vec().into();
    let m = s.mut_metadata();
    m.index = index;
    m.term = term;
    let cs = m.mut_conf_state();
    cs.voters = voters;
    cs.learners = learners;
    s
}

fn snap_out<'py>(py: Python<'py>, s: &Snapshot) -> PySnap<'py> {
    let m = s.get_metadata();
    (
        m.index,
        m.term,
        m.get_conf_state().voters.clone(),
        m.get_conf_state().learners.clone(),
        PyBytes::new(py, &s.data),
    )
}

fn messages_out<'py>(
    py: Python<'py>,
    msgs: Vec<Message>,
) -> PyResult<Vec<(u64, i32, Bound<'py, PyBytes>)>> {
    msgs.iter()
        .map(|m| {
            let raw = m
                .write_to_bytes()
                .map_err(|e| RaftError::new_err(format!("encode message: {e}")))?;
            Ok((m.to, m.get_msg_type() as i32, PyBytes::new(py, &raw)))
        })
        .collect()
}

/// 0 add, 1 remove, 2 add as learner (the codes Python uses).
fn change_type(code: i32) -> PyResult<ConfChangeType> {
    match code {
        0 => Ok(ConfChangeType::AddNode),
        1 => Ok(ConfChangeType::RemoveNode),
        2 => Ok(ConfChangeType::AddLearnerNode),
        c => Err(PyValueError::new_err(format!(
            "unknown conf change type {c}"
        ))),
    }
}

fn role_code(r: StateRole) -> u8 {
    match r {
        StateRole::Follower => 0,
        StateRole::Candidate => 1,
        StateRole::Leader => 2,
        StateRole::PreCandidate => 3,
    }
}

fn parse_message(raw: &[u8]) -> PyResult<Message> {
    Message::parse_from_bytes(raw)
        .map_err(|e| RaftError::new_err(format!("malformed message: {e}")))
}

// ---- the node ---------------------------------------------------------------------------

/// A raft-rs `RawNode` over an in-memory mirror of the durable log.
#[pyclass(module = "nebula.raft._core")]
struct Node {
    raw: RawNode<Store>,
    pending: Option<raft::Ready>,
}

impl Node {
    /// Proposals go to a leader only (see `propose`).
    fn leader_only(&self) -> PyResult<()> {
        if self.raw.raft.state == StateRole::Leader {
            Ok(())
        } else {
            Err(ProposalDropped::new_err("proposal dropped: not the leader"))
        }
    }
}

#[pymethods]
impl Node {
    /// Build a node from what the durable log holds.
    ///
    /// ``snapshot`` = (index, term, voters, learners, data) or None; without a snapshot
    /// ``voters``/``learners`` give the conf state (a node joining a cluster passes none
    /// and waits for the leader's snapshot).  ``entries`` are (index, term, type, data,
    /// context) after the snapshot, contiguous.  ``applied`` is the index the state machine
    /// holds already (the snapshot's).  ``min/max_election_tick`` bound the randomized
    /// election timeout (``[min, max)``; 0 = raft-rs's defaults ``[e, 2e)``).
    /// ``skip_bcast_commit``: do not send an entry-less append to every follower just to
    /// move its commit index (followers learn it from the next append or heartbeat).
    #[new]
    #[pyo3(signature = (
        id, *, election_tick = 10, heartbeat_tick = 1, min_election_tick = 0,
        max_election_tick = 0, pre_vote = true, check_quorum = true,
        max_size_per_msg = 1 << 20, max_inflight_msgs = 256, applied = 0,
        hard_state = (0, 0, 0), snapshot = None, voters = Vec::new(), learners = Vec::new(),
        entries = Vec::new(), max_committed_size_per_ready = 0, skip_bcast_commit = false
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        id: u64,
        election_tick: usize,
        heartbeat_tick: usize,
        min_election_tick: usize,
        max_election_tick: usize,
        pre_vote: bool,
        check_quorum: bool,
        max_size_per_msg: u64,
        max_inflight_msgs: usize,
        applied: u64,
        hard_state: (u64, u64, u64),
        snapshot: Option<InSnap>,
        voters: Vec<u64>,
        learners: Vec<u64>,
        entries: Vec<InEntry>,
        max_committed_size_per_ready: u64,
        skip_bcast_commit: bool,
    ) -> PyResult<Self> {
        let mut store = Store::default();
        match snapshot {
            Some(s) => store.apply_snapshot(snap_in(s)),
            None => {
                store.cs.voters = voters;
                store.cs.learners = learners;
            }
        }
        let ents = entries
            .into_iter()
            .map(entry_in)
            .collect::<PyResult<Vec<_>>>()?;
        store.append(ents)?;
        let (term, vote, commit) = hard_state;
        store.hs.term = cmp::max(store.hs.term, term);
        store.hs.vote = vote;
        store.hs.commit = cmp::max(store.hs.commit, commit);
        if store.hs.commit > store.last() {
            // A commit index beyond the durable log would be a lie raft-rs panics on.
            return Err(RaftError::new_err(format!(
                "hard state commit {} is beyond the last durable entry {}",
                store.hs.commit,
                store.last()
            )));
        }
        let mut cfg = Config::new(id);
        cfg.election_tick = election_tick;
        cfg.heartbeat_tick = heartbeat_tick;
        cfg.min_election_tick = min_election_tick;
        cfg.max_election_tick = max_election_tick;
        cfg.pre_vote = pre_vote;
        cfg.check_quorum = check_quorum;
        cfg.max_size_per_msg = max_size_per_msg;
        cfg.max_inflight_msgs = max_inflight_msgs;
        cfg.applied = cmp::min(applied, store.hs.commit);
        cfg.skip_bcast_commit = skip_bcast_commit;
        if max_committed_size_per_ready > 0 {
            cfg.max_committed_size_per_ready = max_committed_size_per_ready;
        }
        cfg.validate().map_err(raft_err)?;
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let raw = RawNode::new(&cfg, store, &logger).map_err(raft_err)?;
        Ok(Node { raw, pending: None })
    }

    /// One logical clock tick; True if raft-rs has something for ready().
    fn tick(&mut self) -> bool {
        self.raw.tick()
    }

    /// Step a message received from ``peer`` (the transport authenticated it).  The
    /// message must name ``peer`` as its sender and this node as its receiver, and must
    /// not be a local message type.
    fn step_from(&mut self, peer: u64, raw: &[u8]) -> PyResult<()> {
        let m = parse_message(raw)?;
        if m.from != peer || m.to != self.raw.raft.id {
            return Err(RaftError::new_err(format!(
                "message from {} to {} arrived from peer {peer}",
                m.from, m.to
            )));
        }
        // A leader's heartbeat commits at most what this node acknowledged (raft-rs sends
        // min(matched, committed)), and an acknowledged entry is durable here.  One that
        // commits past the log came from no correct leader (a member of another cluster
        // sharing the secret, an old incarnation, a bug): raft-rs would panic on it and
        // the node would stop for good, so it is refused like any other bad message.
        let last = self.raw.raft.raft_log.last_index();
        if m.get_msg_type() == MessageType::MsgHeartbeat && m.commit > last {
            return Err(RaftError::new_err(format!(
                "heartbeat from {peer} (term {}) commits index {} past this log's last \
                 index {last}; refused",
                m.term, m.commit
            )));
        }
        self.raw.step(m).map_err(raft_err)
    }

    /// Propose ``data``; returns (term, index) the entry got in this leader's log.
    /// Only a leader takes proposals (raft-rs would forward a follower's to its leader and
    /// report success, with no index of its own to wait on).
    fn propose(&mut self, context: PyBackedBytes, data: PyBackedBytes) -> PyResult<(u64, u64)> {
        self.leader_only()?;
        self.raw
            .propose(context.to_vec(), data.to_vec())
            .map_err(raft_err)?;
        Ok((self.raw.raft.term, self.raw.raft.raft_log.last_index()))
    }

    /// Propose every item of ``data`` as one message: the entries are appended together
    /// (all or none: raft-rs's uncommitted-size limit refuses the whole message) at
    /// consecutive indexes, and each follower gets them in one append.  Returns
    /// (term, index of the first).  An empty list is refused (raft-rs treats an empty
    /// proposal as a fatal error).
    fn propose_many(&mut self, data: Vec<PyBackedBytes>) -> PyResult<(u64, u64)> {
        if data.is_empty() {
            return Err(PyValueError::new_err("propose_many: no entries"));
        }
        self.leader_only()?;
        let n = data.len() as u64;
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgPropose);
        m.from = self.raw.raft.id;
        let entries: Vec<Entry> = data
            .iter()
            .map(|d| {
                let mut e = Entry::default();
                e.data = d.to_vec().into();
                e
            })
            .collect();
        m.set_entries(entries.into());
        self.raw.raft.step(m).map_err(raft_err)?;
        Ok((
            self.raw.raft.term,
            self.raw.raft.raft_log.last_index() + 1 - n,
        ))
    }

    /// Propose adding (change 0), removing (1) or adding as a learner (2) ``node_id``;
    /// ``context`` travels with the entry (the new member's address).  Returns (term, index).
    fn propose_conf_change(
        &mut self,
        change: i32,
        node_id: u64,
        context: PyBackedBytes,
    ) -> PyResult<(u64, u64)> {
        self.leader_only()?;
        let context = context.to_vec();
        let mut cc = ConfChange::default();
        cc.set_change_type(change_type(change)?);
        cc.node_id = node_id;
        cc.context = context.clone().into();
        self.raw
            .propose_conf_change(context, cc)
            .map_err(raft_err)?;
        Ok((self.raw.raft.term, self.raw.raft.raft_log.last_index()))
    }

    /// Apply a committed conf-change entry's data; returns (change, node_id, context,
    /// voters, learners).
    fn apply_conf_change<'py>(
        &mut self,
        py: Python<'py>,
        data: &[u8],
    ) -> PyResult<PyConfChange<'py>> {
        let cc = ConfChange::parse_from_bytes(data)
            .map_err(|e| RaftError::new_err(format!("malformed conf change: {e}")))?;
        let cs = self.raw.apply_conf_change(&cc).map_err(raft_err)?;
        self.raw.mut_store().cs = cs.clone();
        let change = match cc.get_change_type() {
            ConfChangeType::AddNode => 0,
            ConfChangeType::RemoveNode => 1,
            ConfChangeType::AddLearnerNode => 2,
        };
        Ok((
            change,
            cc.node_id,
            PyBytes::new(py, &cc.context),
            cs.voters,
            cs.learners,
        ))
    }

    fn campaign(&mut self) -> PyResult<()> {
        self.raw.campaign().map_err(raft_err)
    }

    fn transfer_leader(&mut self, to: u64) {
        self.raw.transfer_leader(to);
    }

    fn report_unreachable(&mut self, id: u64) {
        self.raw.report_unreachable(id);
    }

    fn report_snapshot(&mut self, id: u64, ok: bool) {
        self.raw.report_snapshot(
            id,
            if ok {
                SnapshotStatus::Finish
            } else {
                SnapshotStatus::Failure
            },
        );
    }

    fn has_ready(&self) -> bool {
        self.pending.is_none() && self.raw.has_ready()
    }

    /// The next Ready, or None.  Returns (number, soft_state, hard_state, snapshot,
    /// entries, messages, committed_entries, persisted_messages, must_sync) where
    /// soft_state = (leader_id, role) or None, hard_state = (term, vote, commit) or None,
    /// messages are (to, msg_type, bytes).  Call advance() once it is persisted.
    #[allow(clippy::type_complexity)]
    fn ready<'py>(&mut self, py: Python<'py>) -> PyResult<Option<PyObject>> {
        if self.pending.is_some() {
            return Err(RaftError::new_err("ready() called twice without advance()"));
        }
        if !self.raw.has_ready() {
            return Ok(None);
        }
        let mut rd = self.raw.ready();
        let ss = rd.ss().map(|s| (s.leader_id, role_code(s.raft_state)));
        let hs = rd.hs().map(|h| (h.term, h.vote, h.commit));
        let snap = if rd.snapshot().get_metadata().index == 0 {
            None
        } else {
            Some(snap_out(py, rd.snapshot()))
        };
        let entries: Vec<PyEntry> = rd.entries().iter().map(|e| entry_out(py, e)).collect();
        let msgs = messages_out(py, rd.take_messages())?;
        let committed: Vec<PyEntry> = rd
            .take_committed_entries()
            .iter()
            .map(|e| entry_out(py, e))
            .collect();
        let pmsgs = messages_out(py, rd.take_persisted_messages())?;
        let out = (
            rd.number(),
            ss,
            hs,
            snap,
            entries,
            msgs,
            committed,
            pmsgs,
            rd.must_sync(),
        );
        self.pending = Some(rd);
        Ok(Some(out.into_pyobject(py)?.into_any().unbind()))
    }

    /// The pending Ready is durable: take it into the in-memory log and let raft-rs go
    /// on.  Returns (commit_index or None, messages, committed_entries) of the LightReady.
    #[allow(clippy::type_complexity)]
    fn advance<'py>(
        &mut self,
        py: Python<'py>,
    ) -> PyResult<(
        Option<u64>,
        Vec<(u64, i32, Bound<'py, PyBytes>)>,
        Vec<PyEntry<'py>>,
    )> {
        let Some(mut rd) = self.pending.take() else {
            return Err(RaftError::new_err("advance() without a pending ready()"));
        };
        {
            let store = self.raw.mut_store();
            if rd.snapshot().get_metadata().index != 0 {
                store.apply_snapshot(rd.snapshot().clone());
            }
            store.append(rd.take_entries())?;
            if let Some(hs) = rd.hs() {
                store.hs = hs.clone();
            }
        }
        let mut light = self.raw.advance(rd);
        if let Some(c) = light.commit_index() {
            let store = self.raw.mut_store();
            store.hs.commit = cmp::max(store.hs.commit, c);
        }
        let msgs = messages_out(py, light.take_messages())?;
        let committed = light
            .take_committed_entries()
            .iter()
            .map(|e| entry_out(py, e))
            .collect();
        Ok((light.commit_index(), msgs, committed))
    }

    /// Every committed entry handed out so far has been applied.
    fn advance_apply(&mut self) {
        self.raw.advance_apply();
    }

    /// Take a snapshot of the state machine at ``index`` (applied, in the log) with the
    /// current conf state, and drop the log up to it.  Returns (index, term, voters,
    /// learners) of the snapshot, for the durable copy.  Persist the snapshot first.
    fn compact(
        &mut self,
        index: u64,
        data: PyBackedBytes,
    ) -> PyResult<(u64, u64, Vec<u64>, Vec<u64>)> {
        let applied = self.raw.raft.raft_log.applied;
        if index > applied {
            return Err(RaftError::new_err(format!(
                "compact to {index} beyond applied {applied}"
            )));
        }
        let cs = self.raw.raft.prs().conf().to_conf_state();
        let store = self.raw.mut_store();
        if index <= store.snap_index() {
            return Err(RaftError::new_err(format!(
                "compact to {index} at or below the snapshot {}",
                store.snap_index()
            )));
        }
        let term = store.term_at(index).map_err(raft_err)?;
        let drop = (index + 1 - store.first()) as usize;
        store.entries.drain(..drop);
        let mut s = Snapshot::default();
        s.data = data.to_vec().into();
        {
            let m = s.mut_metadata();
            m.index = index;
            m.term = term;
            m.set_conf_state(cs.clone());
        }
        store.snap = s;
        Ok((index, term, cs.voters, cs.learners))
    }

    #[getter]
    fn id(&self) -> u64 {
        self.raw.raft.id
    }

    #[getter]
    fn term(&self) -> u64 {
        self.raw.raft.term
    }

    #[getter]
    fn role(&self) -> u8 {
        role_code(self.raw.raft.state)
    }

    #[getter]
    fn leader_id(&self) -> u64 {
        self.raw.raft.leader_id
    }

    #[getter]
    fn commit_index(&self) -> u64 {
        self.raw.raft.raft_log.committed
    }

    #[getter]
    fn applied_index(&self) -> u64 {
        self.raw.raft.raft_log.applied
    }

    #[getter]
    fn last_index(&self) -> u64 {
        self.raw.raft.raft_log.last_index()
    }

    #[getter]
    fn first_index(&self) -> u64 {
        self.raw.raft.raft_log.first_index()
    }

    #[getter]
    fn snapshot_index(&self) -> u64 {
        self.raw.store().snap_index()
    }

    /// Term of the entry at ``index`` (None if compacted or unknown).
    fn term_at(&self, index: u64) -> Option<u64> {
        self.raw.raft.raft_log.term(index).ok()
    }

    #[getter]
    fn voters(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.raw.raft.prs().conf().voters().ids().iter().collect();
        v.sort_unstable();
        v
    }

    #[getter]
    fn learners(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.raw.raft.prs().conf().to_conf_state().learners;
        v.sort_unstable();
        v
    }

    #[getter]
    fn lead_transferee(&self) -> Option<u64> {
        self.raw.raft.lead_transferee
    }

    /// The leader's view of every member: {id: (matched, next_index, state, recent_active)}
    /// with state 0 probe, 1 replicate, 2 snapshot.  Empty on a follower.
    fn progress<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        if self.raw.raft.state != StateRole::Leader {
            return Ok(d);
        }
        for (id, pr) in self.raw.raft.prs().iter() {
            let state = match pr.state {
                raft::ProgressState::Probe => 0,
                raft::ProgressState::Replicate => 1,
                raft::ProgressState::Snapshot => 2,
            };
            d.set_item(*id, (pr.matched, pr.next_idx, state, pr.recent_active))?;
        }
        Ok(d)
    }
}

/// (msg_type, from, to, term, log_term, index, commit, reject, n_entries, context) of an
/// encoded message: what a hook needs to read without a full decode in Python.
#[pyfunction]
#[allow(clippy::type_complexity)]
fn message_info<'py>(
    py: Python<'py>,
    raw: &[u8],
) -> PyResult<(
    i32,
    u64,
    u64,
    u64,
    u64,
    u64,
    u64,
    bool,
    usize,
    Bound<'py, PyBytes>,
)> {
    let m = parse_message(raw)?;
    Ok((
        m.get_msg_type() as i32,
        m.from,
        m.to,
        m.term,
        m.log_term,
        m.index,
        m.commit,
        m.reject,
        m.entries.len(),
        PyBytes::new(py, &m.context),
    ))
}

/// The message with its ``context`` field replaced (the hook for piggybacked data, e.g. a
/// follower's signature share on its append acknowledgement).
#[pyfunction]
fn message_with_context<'py>(
    py: Python<'py>,
    raw: &[u8],
    context: PyBackedBytes,
) -> PyResult<Bound<'py, PyBytes>> {
    let mut m = parse_message(raw)?;
    m.context = context.to_vec().into();
    let out = m
        .write_to_bytes()
        .map_err(|e| RaftError::new_err(format!("encode message: {e}")))?;
    Ok(PyBytes::new(py, &out))
}

/// Encode a ConfChange (what a conf-change entry holds) - for tests and tools.
#[pyfunction]
fn encode_conf_change<'py>(
    py: Python<'py>,
    change: i32,
    node_id: u64,
    context: PyBackedBytes,
) -> PyResult<Bound<'py, PyBytes>> {
    let mut cc = ConfChange::default();
    cc.set_change_type(change_type(change)?);
    cc.node_id = node_id;
    cc.context = context.to_vec().into();
    let out = cc
        .write_to_bytes()
        .map_err(|e| RaftError::new_err(format!("encode: {e}")))?;
    Ok(PyBytes::new(py, &out))
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Node>()?;
    m.add_class::<signer::Ed25519Key>()?;
    m.add_class::<signer::SignWorker>()?;
    m.add_class::<syncer::SyncWorker>()?;
    m.add_function(wrap_pyfunction!(message_info, m)?)?;
    m.add_function(wrap_pyfunction!(message_with_context, m)?)?;
    m.add_function(wrap_pyfunction!(encode_conf_change, m)?)?;
    m.add("RaftError", m.py().get_type::<RaftError>())?;
    m.add("ProposalDropped", m.py().get_type::<ProposalDropped>())?;
    m.add("RAFT_RS_VERSION", "0.7.0")?;
    m.add("MSG_SNAPSHOT", MessageType::MsgSnapshot as i32)?;
    m.add("MSG_APPEND", MessageType::MsgAppend as i32)?;
    m.add("MSG_APPEND_RESPONSE", MessageType::MsgAppendResponse as i32)?;
    m.add("MSG_HEARTBEAT", MessageType::MsgHeartbeat as i32)?;
    m.add(
        "MSG_HEARTBEAT_RESPONSE",
        MessageType::MsgHeartbeatResponse as i32,
    )?;
    m.add("MSG_TIMEOUT_NOW", MessageType::MsgTimeoutNow as i32)?;
    Ok(())
}
