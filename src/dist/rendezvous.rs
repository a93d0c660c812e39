//! Rendezvous over TCP: rank 0 listens on MASTER_PORT, every other rank connects to
//! MASTER_ADDR:MASTER_PORT and says who it is; the result is a star of connections through
//! rank 0 ([`Links`]). It carries the NCCL unique id, and [`super::TcpSync`]'s reductions.
//!
//! Every wait has a deadline, so a rank that never comes, dies, or stalls becomes an error that
//! names it, never a hang.

use super::env::{DistEnv, Master};
use anyhow::{bail, Context, Result};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// Opens every connection; a stray client (port scanner, stale job) is dropped, not trusted.
const MAGIC: &[u8; 8] = b"mhc-dist";
/// Bumped when the wire format changes, so mixed binaries fail at start-up, not mid-run.
const PROTOCOL: u32 = 1;
/// Pause between connection attempts while rank 0 is not listening yet.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// The star of connections of one rank: rank 0 holds one per other rank, the others one to rank 0.
pub struct Links {
    rank: usize,
    world: usize,
    master: Master,
    pub(crate) peers: Peers,
}

pub(crate) enum Peers {
    /// Index `r - 1` is the connection to rank `r`.
    Root(Vec<TcpStream>),
    Leaf(TcpStream),
}

impl Links {
    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    pub fn master(&self) -> &Master {
        &self.master
    }

    /// Rank 0's `data` (e.g. the 128-byte NCCL unique id) on every rank; `data` is ignored on
    /// the other ranks. Each wait lasts at most `timeout`.
    pub fn broadcast(&mut self, data: &[u8], timeout: Duration) -> Result<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let rank = self.rank;
        match &mut self.peers {
            Peers::Root(streams) => {
                for (index, stream) in streams.iter_mut().enumerate() {
                    send_frame(stream, data, deadline)
                        .map_err(|e| peer_error(0, index + 1, &e, timeout))?;
                }
                Ok(data.to_vec())
            }
            Peers::Leaf(stream) => {
                recv_frame(stream, deadline).map_err(|e| peer_error(rank, 0, &e, timeout))
            }
        }
    }
}

/// Connects this rank to the others through MASTER_ADDR:MASTER_PORT. Rank 0 listens (on every
/// interface, MASTER_PORT) and waits until ranks 1..world have all connected; the others retry
/// until rank 0 answers. Fails after `timeout` naming the address and the missing ranks.
pub fn rendezvous(env: &DistEnv, timeout: Duration) -> Result<Links> {
    let master = env
        .master
        .clone()
        .context("a rendezvous needs MASTER_ADDR and MASTER_PORT (world > 1)")?;
    let deadline = Instant::now() + timeout;
    let peers = if env.rank == 0 {
        Peers::Root(serve(env, &master, deadline, timeout)?)
    } else {
        Peers::Leaf(join(env, &master, deadline, timeout)?)
    };
    Ok(Links {
        rank: env.rank,
        world: env.world,
        master,
        peers,
    })
}

fn resolve(master: &Master) -> io::Result<Vec<SocketAddr>> {
    Ok((master.host.as_str(), master.port)
        .to_socket_addrs()?
        .collect())
}

/// Rank 0: accept until every other rank has said hello, then tell them all to go.
fn serve(
    env: &DistEnv,
    master: &Master,
    deadline: Instant,
    timeout: Duration,
) -> Result<Vec<TcpStream>> {
    // Bind every interface of MASTER_ADDR's family: MASTER_ADDR is how the others reach this
    // host, which may be a name resolving to an address no interface carries (NAT, /etc/hosts).
    let ipv6 = resolve(master)
        .map(|addrs| addrs.first().is_some_and(SocketAddr::is_ipv6))
        .unwrap_or(false);
    let any: IpAddr = if ipv6 {
        Ipv6Addr::UNSPECIFIED.into()
    } else {
        Ipv4Addr::UNSPECIFIED.into()
    };
    let listener = TcpListener::bind((any, master.port)).with_context(|| {
        format!(
            "rank 0 cannot listen on MASTER_PORT={} (MASTER_ADDR:MASTER_PORT = {master}); is the port in use?",
            master.port
        )
    })?;
    listener.set_nonblocking(true)?;
    let mut slots: Vec<Option<TcpStream>> = (1..env.world).map(|_| None).collect();
    while slots.iter().any(Option::is_none) {
        match listener.accept() {
            Ok((stream, from)) => {
                if let Some((rank, stream)) = greet(stream, env.world, deadline)? {
                    if slots[rank - 1].is_some() {
                        bail!("rank 0: two processes claim RANK={rank} (the second from {from}); every process needs its own RANK");
                    }
                    slots[rank - 1] = Some(stream);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<String> = slots
                        .iter()
                        .enumerate()
                        .filter(|(_, s)| s.is_none())
                        .map(|(i, _)| (i + 1).to_string())
                        .collect();
                    bail!(
                        "rank 0: {} of the {} other ranks did not connect to MASTER_ADDR:MASTER_PORT = {master} within {timeout:?} (missing ranks: {}); did they start, with the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE?",
                        missing.len(),
                        env.world - 1,
                        missing.join(", ")
                    );
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e).context("rank 0: accepting a rendezvous connection failed"),
        }
    }
    let mut streams: Vec<TcpStream> = slots.into_iter().flatten().collect();
    for (index, stream) in streams.iter_mut().enumerate() {
        send_all(stream, &[MAGIC.as_slice(), &[0]].concat(), deadline)
            .map_err(|e| peer_error(0, index + 1, &e, timeout))?;
    }
    Ok(streams)
}

/// Reads a newcomer's hello. `None` for a client that is not one of ours (it is dropped).
fn greet(
    mut stream: TcpStream,
    world: usize,
    deadline: Instant,
) -> Result<Option<(usize, TcpStream)>> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    let mut hello = [0u8; 20];
    // A client of ours writes its hello right after connecting: a short wait suffices, and a
    // silent stranger cannot hold up the rendezvous.
    let hello_deadline = deadline.min(Instant::now() + Duration::from_secs(5));
    if recv_exact(&mut stream, &mut hello, hello_deadline).is_err() || &hello[..8] != MAGIC {
        return Ok(None);
    }
    let word = |i: usize| u32::from_le_bytes(hello[i..i + 4].try_into().expect("4 bytes")) as usize;
    let (protocol, rank, their_world) = (word(8), word(12), word(16));
    if protocol != PROTOCOL as usize {
        bail!("rank 0: rank {rank} speaks rendezvous protocol {protocol}, this binary {PROTOCOL}: run the same mhc-train build on every rank");
    }
    if their_world != world {
        bail!("rank 0 has WORLD_SIZE={world} but rank {rank} has WORLD_SIZE={their_world}: every process needs the same WORLD_SIZE");
    }
    if rank == 0 || rank >= world {
        bail!(
            "rank 0: a process with RANK={rank} connected; ranks 1..{} were expected",
            world - 1
        );
    }
    Ok(Some((rank, stream)))
}

/// Rank > 0: connect (retrying while rank 0 is not up yet), say hello, wait for the go.
fn join(env: &DistEnv, master: &Master, deadline: Instant, timeout: Duration) -> Result<TcpStream> {
    let rank = env.rank;
    let mut last_error = String::from("no attempt made");
    let mut stream = loop {
        if Instant::now() >= deadline {
            bail!(
                "rank {rank}: cannot reach rank 0 at MASTER_ADDR:MASTER_PORT = {master} within {timeout:?} (last error: {last_error}); is rank 0 running with the same MASTER_ADDR and MASTER_PORT?"
            );
        }
        match resolve(master) {
            Ok(addrs) if addrs.is_empty() => last_error = "the name resolves to no address".into(),
            Ok(addrs) => {
                let mut connected = None;
                for addr in addrs {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match TcpStream::connect_timeout(
                        &addr,
                        left.clamp(Duration::from_millis(1), Duration::from_secs(2)),
                    ) {
                        Ok(s) => {
                            connected = Some(s);
                            break;
                        }
                        Err(e) => last_error = format!("{addr}: {e}"),
                    }
                }
                if let Some(s) = connected {
                    break s;
                }
            }
            Err(e) => last_error = format!("cannot resolve MASTER_ADDR={}: {e}", master.host),
        }
        std::thread::sleep(RETRY_PAUSE);
    };
    stream.set_nodelay(true)?;
    let mut hello = Vec::with_capacity(20);
    hello.extend_from_slice(MAGIC);
    for word in [PROTOCOL, rank as u32, env.world as u32] {
        hello.extend_from_slice(&word.to_le_bytes());
    }
    send_all(&mut stream, &hello, deadline).map_err(|e| peer_error(rank, 0, &e, timeout))?;
    let mut go = [0u8; 9];
    recv_exact(&mut stream, &mut go, deadline).map_err(|e| {
        anyhow::anyhow!(
            "rank {rank}: connected to rank 0 at {master}, but the rendezvous did not complete: {} (rank 0 waits for all {} ranks; see its error)",
            describe(&e, timeout),
            env.world
        )
    })?;
    if &go[..8] != MAGIC || go[8] != 0 {
        bail!("rank {rank}: the process at {master} is not an mhc-train rank 0");
    }
    Ok(stream)
}

/// The error of a wait on `peer` seen from `rank`, naming both.
pub(crate) fn peer_error(
    rank: usize,
    peer: usize,
    e: &io::Error,
    timeout: Duration,
) -> anyhow::Error {
    anyhow::anyhow!("rank {rank}: rank {peer} {}", describe(e, timeout))
}

/// What an I/O error on a peer connection means for the run.
pub(crate) fn describe(e: &io::Error, timeout: Duration) -> String {
    match e.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => {
            "closed its connection (the process exited or crashed; see its own error)".into()
        }
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            format!("did not answer within {timeout:?} (stuck, or too slow for the timeout)")
        }
        _ => format!("is unreachable: {e}"),
    }
}

fn remaining(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"))
    } else {
        Ok(left)
    }
}

/// `write_all` that gives up at `deadline`.
pub(crate) fn send_all(
    stream: &mut TcpStream,
    mut bytes: &[u8],
    deadline: Instant,
) -> io::Result<()> {
    while !bytes.is_empty() {
        stream.set_write_timeout(Some(remaining(deadline)?))?;
        match stream.write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `read_exact` that gives up at `deadline`.
pub(crate) fn recv_exact(
    stream: &mut TcpStream,
    mut buf: &mut [u8],
    deadline: Instant,
) -> io::Result<()> {
    while !buf.is_empty() {
        stream.set_read_timeout(Some(remaining(deadline)?))?;
        match stream.read(buf) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A length-prefixed message.
pub(crate) fn send_frame(
    stream: &mut TcpStream,
    bytes: &[u8],
    deadline: Instant,
) -> io::Result<()> {
    send_all(stream, &(bytes.len() as u64).to_le_bytes(), deadline)?;
    send_all(stream, bytes, deadline)
}

pub(crate) fn recv_frame(stream: &mut TcpStream, deadline: Instant) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 8];
    recv_exact(stream, &mut len, deadline)?;
    let mut bytes = vec![0u8; u64::from_le_bytes(len) as usize];
    recv_exact(stream, &mut bytes, deadline)?;
    Ok(bytes)
}
