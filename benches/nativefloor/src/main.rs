//! nativefloor: a native (Rust, single-threaded mio/epoll per process) counterpart of
//! Nebula's `bench --floor` 3-node group-commit scenario (nebula/bench/floor.py).
//!
//! Processes (same topology as floor.py):
//!   * `run` (the client, "the validators"): spawns two followers and a leader, then opens
//!     K TCP connections to the leader and drives K closed loops (one request in flight per
//!     connection) from one thread; warmup, then a timed part; records per-request latency.
//!   * `leader`: dials both followers; accepts client connections; each loop pass reads what
//!     arrived on every connection, then group-commits it: one write of the batch to each
//!     follower, one pwrite(4 KiB block at offset 0) + fdatasync of its own; answers every
//!     request of a batch once its own copy and one follower's ack make a majority durable.
//!   * `follower`: accepts the leader; for what one read pass brought: one pwrite + fdatasync,
//!     then acknowledges the last sequence number.
//!
//! Modes:
//!   * `bare`: floor.py's work exactly: 200-byte requests and answers (the answer echoes the
//!     request), 200-byte records (8-byte sequence + 192 bytes) forwarded; no crypto.
//!   * `real`: per request also what Nebula must do: the client seals a SecretConnection
//!     frame (4-byte length + 1024 data bytes, ChaCha20-Poly1305, 1044 bytes on the wire)
//!     holding a 100-byte request; the leader opens it, forwards 8-byte g + 100 bytes per
//!     request in one sealed transport frame per batch (as Nebula's Raft transport seals
//!     every frame), followers open it and answer with a sealed ack; after commit the
//!     leader Ed25519-signs the 100-byte request (ed25519-dalek) and seals a 150-byte
//!     answer (seq + signature + pad) in a 1044-byte frame; the client opens it.

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener as StdListener, TcpStream as StdStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce, Tag};
use ed25519_dalek::{Signer, SigningKey};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

const BLOCK: usize = 4096;
const BARE_SIZE: usize = 200; // floor.py REQUEST_SIZE
const FRAME_PLAIN: usize = 1028; // SecretConnection: 4-byte length + 1024 data
const TAG: usize = 16;
const FRAME_WIRE: usize = FRAME_PLAIN + TAG; // 1044
const REQ_PAYLOAD: usize = 100;
const ANS_PAYLOAD: usize = 150;
const FWD_REC_REAL: usize = 8 + REQ_PAYLOAD;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Bare,
    Real,
}

impl Mode {
    fn parse(s: &str) -> Mode {
        match s {
            "bare" => Mode::Bare,
            "real" => Mode::Real,
            _ => panic!("mode must be bare or real"),
        }
    }
    fn name(self) -> &'static str {
        match self {
            Mode::Bare => "bare",
            Mode::Real => "real",
        }
    }
    /// bytes per request and per answer on a client connection
    fn wire(self) -> usize {
        match self {
            Mode::Bare => BARE_SIZE,
            Mode::Real => FRAME_WIRE,
        }
    }
}

// ---- crypto helpers -------------------------------------------------------------------

/// One direction of a sealed stream: a key and a 96-bit counter nonce (as SecretConnection).
struct Dir {
    aead: ChaCha20Poly1305,
    n: u64,
}

impl Dir {
    fn new(label: u8, conn: u32) -> Dir {
        let mut k = [0u8; 32];
        for (i, b) in k.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31) ^ label;
        }
        k[0..4].copy_from_slice(&conn.to_le_bytes());
        Dir { aead: ChaCha20Poly1305::new(Key::from_slice(&k)), n: 0 }
    }
    fn nonce(&mut self) -> [u8; 12] {
        let mut nn = [0u8; 12];
        nn[4..].copy_from_slice(&self.n.to_le_bytes());
        self.n += 1;
        nn
    }
    /// seal buf in place and append the tag
    fn seal(&mut self, buf: &mut Vec<u8>, start: usize) {
        let nn = self.nonce();
        let tag = self
            .aead
            .encrypt_in_place_detached(Nonce::from_slice(&nn), b"", &mut buf[start..])
            .expect("seal");
        buf.extend_from_slice(&tag);
    }
    /// open sealed (ciphertext + tag) in place; returns the plaintext length
    fn open(&mut self, sealed: &mut [u8]) -> usize {
        let nn = self.nonce();
        let n = sealed.len() - TAG;
        let (ct, tag) = sealed.split_at_mut(n);
        let tag = Tag::clone_from_slice(tag);
        self.aead
            .decrypt_in_place_detached(Nonce::from_slice(&nn), b"", ct, &tag)
            .expect("open: bad tag");
        n
    }
}

/// A SecretConnection data frame holding `payload`, sealed: appended to `out`.
fn seal_frame(d: &mut Dir, payload: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
    out.resize(start + FRAME_PLAIN, 0);
    d.seal(out, start);
}

/// Open a sealed 1044-byte frame in place; returns the payload range.
fn open_frame(d: &mut Dir, frame: &mut [u8]) -> std::ops::Range<usize> {
    d.open(frame);
    let n = u32::from_le_bytes(frame[0..4].try_into().unwrap()) as usize;
    4..4 + n
}

// ---- small I/O helpers ---------------------------------------------------------------

fn durable_file(dir: &str, name: &str) -> i32 {
    let path = std::ffi::CString::new(format!("{}/{}", dir, name)).unwrap();
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC, 0o600) };
    assert!(fd >= 0, "open {}", io::Error::last_os_error());
    let z = [0u8; BLOCK];
    unsafe {
        assert_eq!(libc::pwrite(fd, z.as_ptr() as *const _, BLOCK, 0), BLOCK as isize);
        assert_eq!(libc::fsync(fd), 0);
    }
    fd
}

/// floor.py's persist(): the last (up to) 4 KiB of what is made durable, one pwrite of a
/// 4 KiB block at offset 0, then fdatasync.
fn persist(fd: i32, block: &mut [u8; BLOCK], data: &[u8]) {
    let tail = &data[data.len().saturating_sub(BLOCK)..];
    block[..tail.len()].copy_from_slice(tail);
    unsafe {
        assert_eq!(libc::pwrite(fd, block.as_ptr() as *const _, BLOCK, 0), BLOCK as isize);
        assert_eq!(libc::fdatasync(fd), 0);
    }
}

/// Write everything (small messages into a socket buffer that is nearly always empty; spin
/// on the rare WouldBlock).
fn write_all(s: &mut TcpStream, mut buf: &[u8]) {
    while !buf.is_empty() {
        match s.write(buf) {
            Ok(0) => panic!("peer closed"),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("write: {e}"),
        }
    }
}

/// Read all that is available (edge-triggered); returns false on EOF.
fn read_avail(s: &mut TcpStream, scratch: &mut [u8], into: &mut Vec<u8>) -> bool {
    loop {
        match s.read(scratch) {
            Ok(0) => return false,
            Ok(n) => into.extend_from_slice(&scratch[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("read: {e}"),
        }
    }
}

fn to_mio(s: StdStream) -> TcpStream {
    s.set_nodelay(true).unwrap();
    s.set_nonblocking(true).unwrap();
    TcpStream::from_std(s)
}

fn listen_and_announce() -> TcpListener {
    let l = StdListener::bind("127.0.0.1:0").unwrap();
    println!("{}", l.local_addr().unwrap().port());
    io::stdout().flush().unwrap();
    l.set_nonblocking(true).unwrap();
    TcpListener::from_std(l)
}

// ---- follower ----------------------------------------------------------------------------

fn follower(mode: Mode, dir: &str) {
    let fd = durable_file(dir, &format!("node-{}", std::process::id()));
    let mut block = [0u8; BLOCK];
    let listener = listen_and_announce();
    // accept the leader (blocking wait through poll)
    let mut poll = Poll::new().unwrap();
    let mut events = Events::with_capacity(64);
    let mut listener = listener;
    poll.registry().register(&mut listener, Token(0), Interest::READABLE).unwrap();
    let mut conn = loop {
        poll.poll(&mut events, None).unwrap();
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => panic!("accept: {e}"),
        }
    };
    conn.set_nodelay(true).unwrap();
    poll.registry().register(&mut conn, Token(1), Interest::READABLE).unwrap();
    let mut scratch = vec![0u8; 256 * 1024];
    let mut buf: Vec<u8> = Vec::with_capacity(256 * 1024);
    let mut rx = Dir::new(b'F', 0);
    let mut tx = Dir::new(b'A', 0);
    let mut plain: Vec<u8> = Vec::with_capacity(256 * 1024);
    let mut ack: Vec<u8> = Vec::with_capacity(64);
    loop {
        poll.poll(&mut events, None).unwrap();
        if !read_avail(&mut conn, &mut scratch, &mut buf) {
            return;
        }
        match mode {
            Mode::Bare => {
                let n = buf.len() / BARE_SIZE * BARE_SIZE;
                if n == 0 {
                    continue;
                }
                persist(fd, &mut block, &buf[..n]);
                let last = n - BARE_SIZE;
                ack.clear();
                ack.extend_from_slice(&buf[last..last + 8]);
                write_all(&mut conn, &ack);
                buf.drain(..n);
            }
            Mode::Real => {
                // frames: u32 sealed length, sealed (records of 8-byte g + 100 bytes)
                plain.clear();
                let mut off = 0;
                while buf.len() - off >= 4 {
                    let len = u32::from_le_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
                    if buf.len() - off - 4 < len {
                        break;
                    }
                    let sealed = &mut buf[off + 4..off + 4 + len];
                    let n = rx.open(sealed);
                    plain.extend_from_slice(&sealed[..n]);
                    off += 4 + len;
                }
                if off == 0 {
                    continue;
                }
                buf.drain(..off);
                persist(fd, &mut block, &plain);
                let last = plain.len() - FWD_REC_REAL;
                ack.clear();
                ack.extend_from_slice(&((8 + TAG) as u32).to_le_bytes());
                ack.extend_from_slice(&plain[last..last + 8]);
                tx.seal(&mut ack, 4);
                write_all(&mut conn, &ack);
            }
        }
    }
}

// ---- leader -------------------------------------------------------------------------------

struct Client {
    s: TcpStream,
    buf: Vec<u8>,
    rx: Dir,
    tx: Dir,
}

struct Pending {
    g: u64,
    conn: usize,
    msg: [u8; BARE_SIZE], // bare: the request (echoed); real: its 100-byte payload
    ans: Vec<u8>,         // --overlap, real: the answer, signed and sealed before commit
}

fn leader(mode: Mode, dir: &str, followers: &[u16], overlap: bool) {
    let fd = durable_file(dir, &format!("node-{}", std::process::id()));
    let mut block = [0u8; BLOCK];
    let mut poll = Poll::new().unwrap();
    // --overlap: the leader's own pwrite + fdatasync runs on a second thread, which
    // coalesces whatever batches are queued into one sync and wakes the loop with the
    // last g it made durable; the loop keeps reading, forwarding and (real) signing.
    const WAKE: usize = 50;
    let durable = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sync_tx = if overlap {
        let waker = mio::Waker::new(poll.registry(), Token(WAKE)).unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<(u64, Vec<u8>)>();
        let d = durable.clone();
        std::thread::spawn(move || {
            let mut block = [0u8; BLOCK];
            while let Ok((mut g, mut data)) = rx.recv() {
                while let Ok((g2, d2)) = rx.try_recv() {
                    g = g2;
                    data = d2;
                }
                persist(fd, &mut block, &data);
                d.store(g, std::sync::atomic::Ordering::Release);
                waker.wake().unwrap();
            }
        });
        Some(tx)
    } else {
        None
    };
    let mut events = Events::with_capacity(1024);
    let mut links: Vec<TcpStream> = Vec::new();
    let mut link_buf: Vec<Vec<u8>> = Vec::new();
    let mut link_rx: Vec<Dir> = Vec::new();
    for (k, p) in followers.iter().enumerate() {
        let mut s = to_mio(StdStream::connect(("127.0.0.1", *p)).unwrap());
        poll.registry().register(&mut s, Token(1 + k), Interest::READABLE).unwrap();
        links.push(s);
        link_buf.push(Vec::new());
        link_rx.push(Dir::new(b'A', 0));
    }
    let mut link_tx: Vec<Dir> = followers.iter().map(|_| Dir::new(b'F', 0)).collect();
    let mut listener = listen_and_announce();
    poll.registry().register(&mut listener, Token(0), Interest::READABLE).unwrap();
    const CLIENT0: usize = 100;
    let mut clients: Vec<Client> = Vec::new();
    let mut scratch = vec![0u8; 256 * 1024];
    let mut acked = vec![0u64; followers.len()];
    let mut own = 0u64;
    let mut counter = 0u64;
    let mut waiting: VecDeque<Pending> = VecDeque::new();
    let mut fwd: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut out: Vec<u8> = Vec::with_capacity(4096);
    let key = SigningKey::from_bytes(&[7u8; 32]);
    let majority = (followers.len() + 1) / 2 + 1;
    let need = majority - 1; // this node's own copy counts

    let try_answer = |acked: &[u64],
                      own: u64,
                      waiting: &mut VecDeque<Pending>,
                      clients: &mut Vec<Client>,
                      out: &mut Vec<u8>| {
        let mut a = acked.to_vec();
        a.sort_unstable_by(|x, y| y.cmp(x));
        let done = if need == 0 { own } else { own.min(a[need - 1]) };
        while let Some(p) = waiting.front() {
            if p.g > done {
                break;
            }
            let p = waiting.pop_front().unwrap();
            let c = &mut clients[p.conn];
            match mode {
                Mode::Bare => write_all(&mut c.s, &p.msg),
                Mode::Real if !p.ans.is_empty() => write_all(&mut c.s, &p.ans),
                Mode::Real => {
                    let sig = key.sign(&p.msg[..REQ_PAYLOAD]);
                    let mut ans = [0u8; ANS_PAYLOAD];
                    ans[..8].copy_from_slice(&p.msg[..8]); // the client's sequence number
                    ans[8..72].copy_from_slice(&sig.to_bytes());
                    out.clear();
                    seal_frame(&mut c.tx, &ans, out);
                    write_all(&mut c.s, out);
                }
            }
        }
    };

    loop {
        poll.poll(&mut events, None).unwrap();
        for ev in events.iter() {
            let t = ev.token().0;
            if t == WAKE {
                own = durable.load(std::sync::atomic::Ordering::Acquire);
                try_answer(&acked, own, &mut waiting, &mut clients, &mut out);
            } else if t == 0 {
                loop {
                    match listener.accept() {
                        Ok((mut s, _)) => {
                            s.set_nodelay(true).unwrap();
                            let i = clients.len();
                            poll.registry().register(&mut s, Token(CLIENT0 + i), Interest::READABLE).unwrap();
                            clients.push(Client {
                                s,
                                buf: Vec::with_capacity(8192),
                                rx: Dir::new(b'C', i as u32),
                                tx: Dir::new(b'S', i as u32),
                            });
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => panic!("accept: {e}"),
                    }
                }
            } else if t < CLIENT0 {
                let k = t - 1;
                if !read_avail(&mut links[k], &mut scratch, &mut link_buf[k]) {
                    return;
                }
                let b = &mut link_buf[k];
                match mode {
                    Mode::Bare => {
                        let n = b.len() / 8 * 8;
                        if n > 0 {
                            let g = u64::from_le_bytes(b[n - 8..n].try_into().unwrap());
                            acked[k] = acked[k].max(g);
                            b.drain(..n);
                        }
                    }
                    Mode::Real => {
                        let rec = 4 + 8 + TAG;
                        let mut off = 0;
                        while b.len() - off >= rec {
                            let sealed = &mut b[off + 4..off + rec];
                            link_rx[k].open(sealed);
                            let g = u64::from_le_bytes(sealed[..8].try_into().unwrap());
                            acked[k] = acked[k].max(g);
                            off += rec;
                        }
                        b.drain(..off);
                    }
                }
                try_answer(&acked, own, &mut waiting, &mut clients, &mut out);
            } else {
                let i = t - CLIENT0;
                let c = &mut clients[i];
                let alive = read_avail(&mut c.s, &mut scratch, &mut c.buf);
                let w = mode.wire();
                let n = c.buf.len() / w * w;
                let mut off = 0;
                while off < n {
                    counter += 1;
                    let g = counter;
                    let mut msg = [0u8; BARE_SIZE];
                    match mode {
                        Mode::Bare => {
                            msg.copy_from_slice(&c.buf[off..off + w]);
                            fwd.extend_from_slice(&g.to_le_bytes());
                            fwd.extend_from_slice(&msg[8..]);
                        }
                        Mode::Real => {
                            let frame = &mut c.buf[off..off + w];
                            let r = open_frame(&mut c.rx, frame);
                            assert_eq!(r.len(), REQ_PAYLOAD);
                            msg[..REQ_PAYLOAD].copy_from_slice(&frame[r]);
                            fwd.extend_from_slice(&g.to_le_bytes());
                            fwd.extend_from_slice(&msg[..REQ_PAYLOAD]);
                        }
                    }
                    waiting.push_back(Pending { g, conn: i, msg, ans: Vec::new() });
                    off += w;
                }
                c.buf.drain(..n);
                if !alive {
                    let _ = poll.registry().deregister(&mut c.s);
                }
            }
        }
        // group commit: what this loop pass read
        if !fwd.is_empty() {
            match mode {
                Mode::Bare => {
                    for l in links.iter_mut() {
                        write_all(l, &fwd);
                    }
                }
                Mode::Real => {
                    for (k, l) in links.iter_mut().enumerate() {
                        out.clear();
                        out.extend_from_slice(&((fwd.len() + TAG) as u32).to_le_bytes());
                        out.extend_from_slice(&fwd);
                        link_tx[k].seal(&mut out, 4);
                        write_all(l, &out);
                    }
                }
            }
            if let Some(tx) = &sync_tx {
                tx.send((counter, fwd.clone())).unwrap();
                fwd.clear();
                if mode == Mode::Real {
                    // sign and seal this batch's answers while the disk and followers work;
                    // they are released only after commit (try_answer)
                    for p in waiting.iter_mut().filter(|p| p.ans.is_empty()) {
                        let sig = key.sign(&p.msg[..REQ_PAYLOAD]);
                        let mut ans = [0u8; ANS_PAYLOAD];
                        ans[..8].copy_from_slice(&p.msg[..8]);
                        ans[8..72].copy_from_slice(&sig.to_bytes());
                        seal_frame(&mut clients[p.conn].tx, &ans, &mut p.ans);
                    }
                }
                continue;
            }
            persist(fd, &mut block, &fwd); // the leader's own copy, while followers write
            own = counter;
            fwd.clear();
            try_answer(&acked, own, &mut waiting, &mut clients, &mut out);
        }
    }
}

// ---- the client / orchestrator --------------------------------------------------------------

fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{}/stat", pid)).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f[11].parse::<u64>().ok()? + f[12].parse::<u64>().ok()?)
}

fn spawn(args: &[String]) -> (Child, u16) {
    let exe = std::env::current_exe().unwrap();
    let mut c = Command::new(exe)
        .args(args)
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(c.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    let port: u16 = line.trim().parse().expect("server did not announce a port");
    (c, port)
}

struct ClientConn {
    s: TcpStream,
    sent: u64,
    t0: Instant,
    got: usize,
    buf: Vec<u8>,
    tx: Dir,
    rx: Dir,
}

fn send_req(mode: Mode, c: &mut ClientConn, pad: &[u8], out: &mut Vec<u8>) {
    c.sent += 1;
    c.t0 = Instant::now();
    out.clear();
    match mode {
        Mode::Bare => {
            out.extend_from_slice(&c.sent.to_le_bytes());
            out.extend_from_slice(&pad[..BARE_SIZE - 8]);
        }
        Mode::Real => {
            let mut p = [0u8; REQ_PAYLOAD];
            p[..8].copy_from_slice(&c.sent.to_le_bytes());
            p[8..].copy_from_slice(&pad[..REQ_PAYLOAD - 8]);
            seal_frame(&mut c.tx, &p, out);
        }
    }
    // one request into an empty send buffer
    match c.s.write(out) {
        Ok(n) if n == out.len() => {}
        r => panic!("client: request did not fit the socket buffer: {r:?}"),
    }
}

fn drive(mode: Mode, poll: &mut Poll, conns: &mut [ClientConn], count: u64, pad: &[u8]) -> Vec<f64> {
    let mut times = Vec::with_capacity(conns.len() * count as usize);
    let mut events = Events::with_capacity(1024);
    let mut out = Vec::with_capacity(2048);
    let w = mode.wire();
    for c in conns.iter_mut() {
        c.sent = 0;
        c.got = 0;
        send_req(mode, c, pad, &mut out);
    }
    let mut left = conns.len();
    while left > 0 {
        poll.poll(&mut events, Some(Duration::from_secs(30))).unwrap();
        if events.is_empty() {
            panic!("server stopped answering");
        }
        for ev in events.iter() {
            let k = ev.token().0;
            let c = &mut conns[k];
            loop {
                if c.sent > count {
                    break;
                }
                let got = c.got;
                match c.s.read(&mut c.buf[got..w]) {
                    Ok(0) => panic!("server closed"),
                    Ok(n) => {
                        c.got += n;
                        if c.got < w {
                            continue;
                        }
                        c.got = 0;
                        let seq = match mode {
                            Mode::Bare => u64::from_le_bytes(c.buf[..8].try_into().unwrap()),
                            Mode::Real => {
                                let r = open_frame(&mut c.rx, &mut c.buf[..w]);
                                assert_eq!(r.len(), ANS_PAYLOAD);
                                u64::from_le_bytes(c.buf[r.start..r.start + 8].try_into().unwrap())
                            }
                        };
                        times.push(c.t0.elapsed().as_secs_f64());
                        assert_eq!(seq, c.sent, "answered out of order");
                        if c.sent == count {
                            c.sent += 1; // done marker
                            left -= 1;
                            break;
                        }
                        send_req(mode, c, pad, &mut out);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => panic!("client read: {e}"),
                }
            }
        }
    }
    times
}

fn percentile(v: &[f64], q: f64) -> f64 {
    let n = v.len();
    let pos = (n - 1) as f64 * q / 100.0;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(n - 1);
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

struct RunResult {
    k: usize,
    rps: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    cpu_ms: [f64; 4], // leader, follower (busiest), client, total of all 4
}

fn run_one(mode: Mode, k: usize, requests: u64, warmup: u64, dir: &str, overlap: bool) -> RunResult {
    let mut children = Vec::new();
    let mut fports = Vec::new();
    for _ in 0..2 {
        let (c, p) = spawn(&["follower".into(), mode.name().into(), dir.into()]);
        children.push(c);
        fports.push(p);
    }
    let fl = fports.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(",");
    let (lc, lport) = spawn(&[
        "leader".into(),
        mode.name().into(),
        dir.into(),
        fl,
        if overlap { "overlap".into() } else { "".into() },
    ]);
    children.push(lc);

    let mut poll = Poll::new().unwrap();
    let mut conns = Vec::new();
    for i in 0..k {
        let mut s = to_mio(StdStream::connect(("127.0.0.1", lport)).unwrap());
        poll.registry().register(&mut s, Token(i), Interest::READABLE).unwrap();
        conns.push(ClientConn {
            s,
            sent: 0,
            t0: Instant::now(),
            got: 0,
            buf: vec![0u8; 2048],
            tx: Dir::new(b'C', i as u32),
            rx: Dir::new(b'S', i as u32),
        });
        // the leader numbers its connections in accept order: connect one at a time
        std::thread::sleep(Duration::from_millis(5));
    }
    let pad: Vec<u8> = (0..BARE_SIZE).map(|i| (i * 37 + 11) as u8).collect();
    if warmup > 0 {
        drive(mode, &mut poll, &mut conns, warmup, &pad);
    }
    let pids: Vec<u32> = children.iter().map(|c| c.id()).chain([std::process::id()]).collect();
    let before: Vec<u64> = pids.iter().map(|p| cpu_ticks(*p).unwrap()).collect();
    let t_start = Instant::now();
    let mut times = drive(mode, &mut poll, &mut conns, requests, &pad);
    let elapsed = t_start.elapsed().as_secs_f64();
    let after: Vec<u64> = pids.iter().map(|p| cpu_ticks(*p).unwrap()).collect();
    drop(conns);
    for c in children.iter_mut() {
        let _ = c.kill();
    }
    for c in children.iter_mut() {
        let _ = c.wait();
    }
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let total = times.len() as f64;
    let ms: Vec<f64> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| (a - b) as f64 / hz * 1000.0 / total)
        .collect();
    times.iter_mut().for_each(|t| *t *= 1000.0);
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    RunResult {
        k,
        rps: total / elapsed,
        p50: percentile(&times, 50.0),
        p90: percentile(&times, 90.0),
        p99: percentile(&times, 99.0),
        cpu_ms: [ms[2], ms[0].max(ms[1]), ms[3], ms.iter().sum()],
    }
}

fn run(args: &[String]) {
    let mut mode = Mode::Bare;
    let mut chains = vec![1usize, 16];
    let mut requests = 3000u64;
    let mut warmup = 300u64;
    let mut parent = "/tmp".to_string();
    let mut overlap = false;
    let mut i = 0;
    while i < args.len() {
        let v = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--mode" => mode = Mode::parse(&v),
            "--chains" => chains = v.split(',').map(|x| x.parse().unwrap()).collect(),
            "--requests" => requests = v.parse().unwrap(),
            "--warmup" => warmup = v.parse().unwrap(),
            "--workdir" => parent = v,
            "--overlap" => {
                overlap = true;
                i += 1;
                continue;
            }
            a => panic!("unknown argument {a}"),
        }
        i += 2;
    }
    let dir = format!("{}/nativefloor-{}", parent, std::process::id());
    std::fs::create_dir_all(&dir).unwrap();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "nativefloor mode={}{} requests/chain={} warmup={} workdir={} loadavg={}",
        mode.name(),
        if overlap { " leader=overlap" } else { " leader=mirror" },
        requests,
        warmup,
        dir,
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    println!(
        "{:>6} {:>9} {:>8} {:>8} {:>8} {:>10} {:>9} {:>9} {:>9}",
        "chains", "req/s", "p50 ms", "p90 ms", "p99 ms", "cpu/req ms", "follower", "client", "all 4"
    );
    let mut res = Vec::new();
    for &k in &chains {
        let r = run_one(mode, k, requests, warmup, &dir, overlap);
        println!(
            "{:>6} {:>9.0} {:>8.4} {:>8.4} {:>8.4} {:>10.4} {:>9.4} {:>9.4} {:>9.4}",
            r.k, r.rps, r.p50, r.p90, r.p99, r.cpu_ms[0], r.cpu_ms[1], r.cpu_ms[2], r.cpu_ms[3]
        );
        res.push(r);
    }
    let _ = std::fs::remove_dir_all(&dir);
    if let Some(one) = res.iter().find(|r| r.k == 1) {
        for r in res.iter().filter(|r| r.k > 1) {
            println!(
                "RATIO mode={}{} chains={}: throughput {:.2}x (target >= 8), p50 {:.2}x (target <= 2)",
                mode.name(),
                if overlap { "+overlap" } else { "" },
                r.k,
                r.rps / one.rps,
                r.p50 / one.p50
            );
        }
    }
}


fn micro() {
    let key = SigningKey::from_bytes(&[7u8; 32]);
    let msg = [5u8; REQ_PAYLOAD];
    let n = 20000;
    let t = Instant::now();
    let mut x = 0u8;
    for _ in 0..n { x ^= key.sign(&msg).to_bytes()[0]; }
    println!("ed25519 sign (100 B): {:.2} us", t.elapsed().as_secs_f64() * 1e6 / n as f64);
    let mut d = Dir::new(1, 0);
    let mut out = Vec::with_capacity(2048);
    let t = Instant::now();
    for _ in 0..n { out.clear(); seal_frame(&mut d, &msg, &mut out); x ^= out[5]; }
    println!("seal 1028-byte frame: {:.2} us", t.elapsed().as_secs_f64() * 1e6 / n as f64);
    let mut e = Dir::new(1, 0);
    let mut frames = Vec::new();
    let mut d2 = Dir::new(1, 0);
    for _ in 0..n { let mut o = Vec::new(); seal_frame(&mut d2, &msg, &mut o); frames.push(o); }
    let t = Instant::now();
    for f in frames.iter_mut() { let r = open_frame(&mut e, f); x ^= f[r.start]; }
    println!("open 1044-byte frame: {:.2} us  ({})", t.elapsed().as_secs_f64() * 1e6 / n as f64, x);
    let fd = durable_file("/tmp", "nativefloor-micro");
    let mut block = [0u8; BLOCK];
    let m = 2000;
    let t = Instant::now();
    for _ in 0..m { persist(fd, &mut block, &msg); }
    println!("pwrite 4 KiB + fdatasync (/tmp): {:.2} us", t.elapsed().as_secs_f64() * 1e6 / m as f64);
    let _ = std::fs::remove_file("/tmp/nativefloor-micro");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(|s| s.as_str()) {
        Some("leader") => {
            let f: Vec<u16> = args[4].split(',').filter(|s| !s.is_empty()).map(|p| p.parse().unwrap()).collect();
            leader(Mode::parse(&args[2]), &args[3], &f, args.get(5).map(|s| s == "overlap").unwrap_or(false))
        }
        Some("follower") => follower(Mode::parse(&args[2]), &args[3]),
        Some("run") => run(&args[2..]),
        Some("micro") => micro(),
        _ => {
            eprintln!("usage: nativefloor run [--mode bare|real] [--chains 1,16] [--requests 3000] [--warmup 300] [--workdir /tmp] [--overlap]");
            std::process::exit(2);
        }
    }
}
