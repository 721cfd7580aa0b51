//! The proxy's faults, each observed the way a user of a link would notice
//! it: through a real TCP connection to a local echo server.
//!
//! Timing assertions have a hard lower bound (the proxy must add at least the
//! configured delay) and a generous upper bound (far below what the broken
//! behaviour would take, far above scheduling noise on a loaded 2-core box).

mod common;

use std::io::ErrorKind;
use std::time::{Duration, Instant};

use common::*;
use geokv_proxy::{ControlClient, DirectionFaults, FaultsPatch, LinkFaults, Proxy, ProxyOptions, ProxySet};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Scheduling slack allowed on top of a configured delay.
const SLACK: Duration = Duration::from_millis(400);

#[tokio::test]
async fn round_trip_adds_both_one_way_latencies() {
    bounded(async {
        let echo = Echo::start().await;
        let link = Proxy::start(any_port(), echo.addr, LinkFaults::symmetric_latency(50)).await.unwrap();
        let mut c = connect(link.local_addr()).await;
        for round in 0..3u8 {
            let start = Instant::now();
            c.write_all(&[round; 16]).await.unwrap();
            assert_eq!(read_n(&mut c, 16, Duration::from_secs(5)).await, vec![round; 16]);
            let rtt = start.elapsed();
            assert!(rtt >= Duration::from_millis(100), "round {round}: rtt {rtt:?} < 2 x 50 ms");
            assert!(rtt < Duration::from_millis(100) + SLACK, "round {round}: rtt {rtt:?}");
        }
        // A half-close travels (delayed) like data, and the connection ends
        // cleanly, not with a reset.
        c.write_all(b"last").await.unwrap();
        c.shutdown().await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest)).await.unwrap().unwrap();
        assert_eq!(rest, b"last");
        link.shutdown().await;
        let stats = link.stats();
        assert_eq!(stats.connections_reset, 0, "{stats:?}");
        assert_eq!(stats.to_upstream.bytes_written, 3 * 16 + 4);
        assert_eq!(stats.to_client.bytes_written, 3 * 16 + 4);
    })
    .await;
}

#[tokio::test]
async fn jitter_never_reorders_bytes() {
    bounded(async {
        let echo = Echo::start().await;
        // Jitter almost as large as the latency: without the order rule,
        // chunks sent 1 ms apart would overtake each other constantly.
        let jittery =
            DirectionFaults { latency_ms: 20, jitter_ms: 19, bandwidth_bytes_per_s: 0, black_hole: false };
        let faults = LinkFaults { to_upstream: jittery.clone(), to_client: jittery, ..Default::default() };
        let link = Proxy::start(any_port(), echo.addr, faults).await.unwrap();
        let mut c = connect(link.local_addr()).await;
        let count = 300u32;
        let (mut r, mut w) = c.split();
        let send = async {
            for i in 0..count {
                w.write_all(&i.to_be_bytes()).await.unwrap();
                if i % 4 == 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        };
        let receive = async {
            let mut got = vec![0u8; count as usize * 4];
            tokio::time::timeout(Duration::from_secs(20), r.read_exact(&mut got)).await.unwrap().unwrap();
            got
        };
        let ((), got) = tokio::join!(send, receive);
        assert_numbered_in_order(&got, count);
        link.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn delayed_chunks_are_pipelined_not_serialized() {
    bounded(async {
        let echo = Echo::start().await;
        let faults = LinkFaults { to_upstream: DirectionFaults::latency(50), ..Default::default() };
        let link = Proxy::start(any_port(), echo.addr, faults).await.unwrap();
        let mut c = connect(link.local_addr()).await;
        // Chunks as large as the proxy's reads, so the kernel cannot merge
        // them into one read and hide a per-read sleep: serialized, chunk i
        // would take about 50 ms x (i + 1), 2.4 s for the last.
        let (count, chunk_bytes) = (48usize, 16 * 1024);
        let start = Instant::now();
        let (mut r, mut w) = c.split();
        // Chunk i is sent at sent[i]; its last byte comes back at got[i].
        let send = async {
            let mut sent = Vec::with_capacity(count);
            for i in 0..count {
                sent.push(start.elapsed());
                w.write_all(&vec![i as u8; chunk_bytes]).await.unwrap();
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            sent
        };
        let receive = async {
            let mut got = Vec::with_capacity(count);
            let mut bytes = Vec::with_capacity(count * chunk_bytes);
            let mut buf = vec![0u8; 64 * 1024];
            // Each read is at least one byte, so this loop is bounded by the
            // byte count (and each read by its timeout).
            while bytes.len() < count * chunk_bytes {
                let n =
                    tokio::time::timeout(Duration::from_secs(10), r.read(&mut buf)).await.unwrap().unwrap();
                assert!(n > 0, "closed early");
                bytes.extend_from_slice(&buf[..n]);
                got.resize(bytes.len() / chunk_bytes, start.elapsed());
            }
            (got, bytes)
        };
        let (sent, (got, bytes)) = tokio::join!(send, receive);
        for (i, chunk) in bytes.chunks(chunk_bytes).enumerate() {
            assert!(chunk.iter().all(|&b| b == i as u8), "chunk {i} changed or out of order");
        }
        for i in 0..count {
            let delay = got[i].saturating_sub(sent[i]);
            assert!(delay >= Duration::from_millis(50), "chunk {i} took {delay:?} < 50 ms");
            assert!(delay < Duration::from_millis(50) + SLACK, "chunk {i} took {delay:?}");
        }
        link.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn bulk_transfer_over_latency_is_window_limited_not_serialized() {
    bounded(async {
        let echo = Echo::start().await;
        let faults = LinkFaults { to_upstream: DirectionFaults::latency(50), ..Default::default() };
        let link = Proxy::start(any_port(), echo.addr, faults).await.unwrap();
        let mut c = connect(link.local_addr()).await;
        let total = 4 * 1024 * 1024;
        let data: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
        let start = Instant::now();
        let (mut r, mut w) = c.split();
        let send = async { w.write_all(&data).await.unwrap() };
        let receive = async {
            let mut got = vec![0u8; total];
            tokio::time::timeout(Duration::from_secs(30), r.read_exact(&mut got)).await.unwrap().unwrap();
            got
        };
        let ((), got) = tokio::join!(send, receive);
        let elapsed = start.elapsed();
        assert!(got == data, "bytes changed in transit");
        // 4 MiB is at least 256 read chunks; one 50 ms sleep each would take
        // 12.8 s. Pipelined, it is one delay plus the copying.
        assert!(elapsed >= Duration::from_millis(50), "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(4), "4 MiB over a 50 ms link took {elapsed:?}");
        link.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn partition_black_holes_and_heal_restores_flow() {
    bounded(async {
        let echo = Echo::start().await;
        let link = Proxy::start(any_port(), echo.addr, LinkFaults::symmetric_latency(5)).await.unwrap();
        let mut busy = connect(link.local_addr()).await;
        let mut idle = connect(link.local_addr()).await;
        for c in [&mut busy, &mut idle] {
            c.write_all(b"hello").await.unwrap();
            assert_eq!(read_n(c, 5, Duration::from_secs(5)).await, b"hello");
        }
        assert_eq!(echo.accepted(), 2);

        link.set_faults(LinkFaults { partition: true, ..link.faults() }).unwrap();
        let written_before = link.stats().to_upstream.bytes_written;
        busy.write_all(b"into the void").await.unwrap();
        // A connection opened during the partition is accepted, but never
        // reaches the upstream.
        let mut during = connect(link.local_addr()).await;
        assert_silent(&mut busy, Duration::from_millis(400)).await;
        assert_silent(&mut during, Duration::from_millis(50)).await;
        let stats = link.stats();
        assert_eq!(stats.to_upstream.bytes_written, written_before, "bytes crossed a partition");
        assert_eq!(stats.to_upstream.bytes_dropped, 13);
        assert_eq!(stats.connections_active, 3, "a partition must not close connections");
        assert_eq!(echo.accepted(), 2, "the upstream was dialled during a partition");

        let healed = link.heal();
        assert_eq!(healed.to_upstream.latency_ms, 5, "heal keeps latency");
        // New data flows on connections whose stream has no gap: the idle
        // one, the one opened during the partition, and new ones.
        let mut after = connect(link.local_addr()).await;
        for c in [&mut idle, &mut during, &mut after] {
            c.write_all(b"again").await.unwrap();
            assert_eq!(read_n(c, 5, Duration::from_secs(5)).await, b"again");
        }
        // The connection that lost bytes can never deliver past the gap: it
        // is reset, as a TCP whose retransmissions ran out would be.
        assert_eq!(closed_within(&mut busy, Duration::from_secs(5)).await, Some(ErrorKind::ConnectionReset));
        link.shutdown().await;
    })
    .await;
}

/// A one-way black hole on the replies: requests reach the upstream and are
/// answered, the answers are lost, later requests still get through; on heal
/// the connection whose reply stream has a gap is reset.
#[tokio::test]
async fn one_way_black_hole_delivers_requests_and_loses_replies() {
    bounded(async {
        let echo = Echo::start().await;
        let link = Proxy::start(any_port(), echo.addr, LinkFaults::symmetric_latency(5)).await.unwrap();
        let mut c = connect(link.local_addr()).await;
        c.write_all(b"hello").await.unwrap();
        assert_eq!(read_n(&mut c, 5, Duration::from_secs(5)).await, b"hello");

        let mut faults = link.faults();
        faults.to_client.black_hole = true;
        link.set_faults(faults).unwrap();
        c.write_all(b"first").await.unwrap();
        assert_silent(&mut c, Duration::from_millis(300)).await;
        c.write_all(b"second").await.unwrap();
        assert_silent(&mut c, Duration::from_millis(300)).await;
        let stats = link.stats();
        assert_eq!(stats.to_upstream.bytes_written, 5 + 11, "requests must cross a reply-only black hole");
        assert_eq!(stats.to_client.bytes_dropped, 11, "the echoes are lost");
        assert_eq!(stats.to_upstream.bytes_dropped, 0);
        assert_eq!(stats.connections_active, 1, "a black hole must not close connections");

        let healed = link.heal();
        assert!(!healed.to_client.black_hole, "heal clears the black hole");
        assert_eq!(closed_within(&mut c, Duration::from_secs(5)).await, Some(ErrorKind::ConnectionReset));
        let mut after = connect(link.local_addr()).await;
        after.write_all(b"again").await.unwrap();
        assert_eq!(read_n(&mut after, 5, Duration::from_secs(5)).await, b"again");

        // The patch and option forms name it per direction.
        let mut patch = FaultsPatch::default();
        patch.set_option("to_upstream.black_hole=on").unwrap();
        let f = patch.apply(&link.faults()).unwrap();
        assert!(f.to_upstream.black_hole && !f.to_client.black_hole);
        assert!(FaultsPatch::default().set_option("black_hole=on").is_err(), "black_hole needs a direction");
        link.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn stall_holds_bytes_then_delivers_all_in_order() {
    bounded(async {
        let echo = Echo::start().await;
        let link = Proxy::start(any_port(), echo.addr, LinkFaults::default()).await.unwrap();
        let mut c = connect(link.local_addr()).await;
        link.set_faults(LinkFaults { stall: true, ..Default::default() }).unwrap();
        let count = 200u32;
        for i in 0..count {
            c.write_all(&i.to_be_bytes()).await.unwrap();
            if i % 20 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        assert_silent(&mut c, Duration::from_millis(400)).await;
        let stats = link.stats();
        assert_eq!(stats.to_upstream.bytes_written, 0, "bytes crossed a stall");
        assert_eq!(stats.to_upstream.bytes_queued, u64::from(count) * 4, "{stats:?}");
        assert_eq!(stats.to_upstream.bytes_dropped, 0);

        link.set_faults(LinkFaults::default()).unwrap();
        let got = read_n(&mut c, count as usize * 4, Duration::from_secs(5)).await;
        assert_numbered_in_order(&got, count);
        let stats = link.stats();
        assert_eq!(stats.to_upstream.bytes_queued, 0);
        assert_eq!(stats.connections_reset, 0);
        link.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn stalled_link_applies_back_pressure_within_its_bound() {
    bounded(async {
        let echo = Echo::start().await;
        let options = ProxyOptions { queue_bytes_max: 64 * 1024, ..Default::default() };
        let faults = LinkFaults { stall: true, ..Default::default() };
        let link = Proxy::start_with(any_port(), echo.addr, faults, options).await.unwrap();
        let mut c = connect(link.local_addr()).await;
        let piece = vec![7u8; 64 * 1024];
        let limit = 256 * 1024 * 1024;
        let mut written = 0usize;
        // Bounded both by `limit` and by the first write that blocks.
        while written < limit {
            match tokio::time::timeout(Duration::from_millis(500), c.write_all(&piece)).await {
                Ok(result) => result.unwrap(),
                Err(_) => break,
            }
            written += piece.len();
        }
        assert!(written < limit, "the sender was never pushed back ({written} bytes accepted)");
        let stats = link.stats();
        assert!(stats.to_upstream.bytes_queued <= 64 * 1024, "queue over its bound: {stats:?}");
        assert!(stats.to_upstream.bytes_queued > 0, "{stats:?}");
        link.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn reset_closes_connections_and_refuse_rejects_new_ones() {
    bounded(async {
        let echo = Echo::start().await;
        let link = Proxy::start(any_port(), echo.addr, LinkFaults::default()).await.unwrap();
        let mut a = connect(link.local_addr()).await;
        let mut b = connect(link.local_addr()).await;
        for c in [&mut a, &mut b] {
            c.write_all(b"x").await.unwrap();
            read_n(c, 1, Duration::from_secs(5)).await;
        }
        assert_eq!(link.reset_all(), 2);
        for c in [&mut a, &mut b] {
            assert_eq!(closed_within(c, Duration::from_secs(5)).await, Some(ErrorKind::ConnectionReset));
        }

        // Without refuse, new connections work right after a reset.
        let mut fresh = connect(link.local_addr()).await;
        fresh.write_all(b"y").await.unwrap();
        assert_eq!(read_n(&mut fresh, 1, Duration::from_secs(5)).await, b"y");

        link.reset(Some(true));
        assert_eq!(closed_within(&mut fresh, Duration::from_secs(5)).await, Some(ErrorKind::ConnectionReset));
        let mut refused = connect(link.local_addr()).await;
        assert_eq!(
            closed_within(&mut refused, Duration::from_secs(5)).await,
            Some(ErrorKind::ConnectionReset)
        );
        assert_eq!(link.stats().connections_refused, 1);

        link.heal();
        let mut back = connect(link.local_addr()).await;
        back.write_all(b"z").await.unwrap();
        assert_eq!(read_n(&mut back, 1, Duration::from_secs(5)).await, b"z");
        let stats = link.stats();
        assert_eq!(stats.connections_reset, 3, "{stats:?}");
        link.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn bandwidth_cap_limits_rate() {
    bounded(async {
        let echo = Echo::start().await;
        let rate = 100_000u64;
        let capped = DirectionFaults { bandwidth_bytes_per_s: rate, ..Default::default() };
        let faults = LinkFaults { to_upstream: capped, ..Default::default() };
        let link = Proxy::start(any_port(), echo.addr, faults).await.unwrap();
        let mut c = connect(link.local_addr()).await;
        let total = 100_000usize;
        let start = Instant::now();
        let (mut r, mut w) = c.split();
        let send = async { w.write_all(&vec![1u8; total]).await.unwrap() };
        let receive = async {
            let mut got = vec![0u8; total];
            tokio::time::timeout(Duration::from_secs(20), r.read_exact(&mut got)).await.unwrap().unwrap();
        };
        tokio::join!(send, receive);
        let elapsed = start.elapsed();
        // 100 kB at 100 kB/s: about 1 s. Unlimited, loopback takes a few ms.
        assert!(elapsed >= Duration::from_millis(800), "{total} bytes at {rate} B/s took only {elapsed:?}");
        assert!(elapsed < Duration::from_millis(1000) + 4 * SLACK, "{elapsed:?}");
        link.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn unreachable_upstream_resets_the_client() {
    bounded(async {
        // A port that was just free: nothing listens there.
        let dead = tokio::net::TcpListener::bind(any_port()).await.unwrap();
        let dead_addr = dead.local_addr().unwrap();
        drop(dead);
        let link = Proxy::start(any_port(), dead_addr, LinkFaults::default()).await.unwrap();
        let mut c = connect(link.local_addr()).await;
        c.write_all(b"anyone?").await.unwrap();
        assert_eq!(closed_within(&mut c, Duration::from_secs(10)).await, Some(ErrorKind::ConnectionReset));
        assert_eq!(link.stats().connections_reset, 1);
        link.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn shutdown_closes_everything() {
    bounded(async {
        let echo = Echo::start().await;
        let link = Proxy::start(any_port(), echo.addr, LinkFaults::symmetric_latency(10)).await.unwrap();
        let addr = link.local_addr();
        let mut c = connect(addr).await;
        c.write_all(b"x").await.unwrap();
        read_n(&mut c, 1, Duration::from_secs(5)).await;
        link.shutdown().await;
        assert_eq!(closed_within(&mut c, Duration::from_secs(5)).await, Some(ErrorKind::ConnectionReset));
        assert_eq!(link.stats().connections_active, 0);
        assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "listener still open");
        link.shutdown().await; // idempotent
    })
    .await;
}

#[tokio::test]
async fn long_lived_framed_connection_survives_latency_changes() {
    bounded(async {
        let (server, _task) = framed_server().await;
        let link = Proxy::start(any_port(), server, LinkFaults::default()).await.unwrap();
        let mut c = connect(link.local_addr()).await;
        // One channel, many calls, the link's distance changing under it as
        // a chaos run would change it.
        let plan = [0u64, 30, 80, 10, 0, 45];
        let mut call = 0u32;
        for latency_ms in plan {
            let jitter_ms = latency_ms / 5;
            let dir = DirectionFaults { latency_ms, jitter_ms, bandwidth_bytes_per_s: 0, black_hole: false };
            link.set_faults(LinkFaults { to_upstream: dir.clone(), to_client: dir, ..Default::default() })
                .unwrap();
            for _ in 0..4 {
                call += 1;
                let payload: Vec<u8> =
                    (0..(call as usize * 3001) % 70_000).map(|i| (i as u32 ^ call) as u8).collect();
                let start = Instant::now();
                write_frame(&mut c, &payload).await.unwrap();
                let answer =
                    tokio::time::timeout(Duration::from_secs(10), read_frame(&mut c)).await.unwrap().unwrap();
                let rtt = start.elapsed();
                let mut expected = payload.clone();
                expected.reverse();
                assert!(answer == expected, "call {call}: wrong answer");
                let floor = Duration::from_millis(2 * (latency_ms - jitter_ms));
                assert!(rtt >= floor, "call {call} at {latency_ms} ms: rtt {rtt:?} < {floor:?}");
                let ceiling = Duration::from_millis(2 * (latency_ms + jitter_ms)) + SLACK;
                assert!(rtt < ceiling, "call {call} at {latency_ms} ms: rtt {rtt:?}");
            }
        }
        let stats = link.stats();
        assert_eq!((stats.connections_accepted, stats.connections_reset), (1, 0), "{stats:?}");
        link.shutdown().await;
    })
    .await;
}

#[tokio::test]
async fn control_api_changes_a_live_link() {
    bounded(async {
        let echo = Echo::start().await;
        let set = ProxySet::new();
        let name = "us-east-1->eu-west-1";
        set.add(name, any_port(), echo.addr, LinkFaults::default()).await.unwrap();
        let control = set.serve_control(any_port()).await.unwrap();
        let api = ControlClient::new(control.local_addr());

        let links = api.links().await.unwrap();
        assert_eq!(links.len(), 1);
        assert_eq!(links[0].name, name);
        let listen = links[0].listen;
        let mut c = connect(listen).await;
        c.write_all(b"a").await.unwrap();
        read_n(&mut c, 1, Duration::from_secs(5)).await;

        // Latency set over HTTP applies to the connection already open.
        let status = api.latency(name, 60).await.unwrap();
        assert_eq!(status.faults.to_client.latency_ms, 60);
        let start = Instant::now();
        c.write_all(b"b").await.unwrap();
        read_n(&mut c, 1, Duration::from_secs(5)).await;
        let rtt = start.elapsed();
        assert!(rtt >= Duration::from_millis(120) && rtt < Duration::from_millis(120) + SLACK, "{rtt:?}");

        // Partition, then heal: latency stays, the partition goes.
        assert!(api.partition(name).await.unwrap().faults.partition);
        c.write_all(b"c").await.unwrap();
        assert_silent(&mut c, Duration::from_millis(300)).await;
        let healed = api.heal(name).await.unwrap();
        assert!(!healed.faults.partition);
        assert_eq!(healed.faults.to_upstream.latency_ms, 60);
        assert_eq!(healed.stats.to_upstream.bytes_dropped, 1);
        assert_eq!(closed_within(&mut c, Duration::from_secs(5)).await, Some(ErrorKind::ConnectionReset));

        // A direction-specific change through the generic setter.
        let mut patch = FaultsPatch::default();
        patch.set_option("to_upstream.bandwidth_bytes_per_s=1000000").unwrap();
        let status = api.set(name, &patch).await.unwrap();
        assert_eq!(status.faults.to_upstream.bandwidth_bytes_per_s, 1_000_000);
        assert_eq!(status.faults.to_client.bandwidth_bytes_per_s, 0);

        // Reset over HTTP.
        let mut d = connect(listen).await;
        d.write_all(b"d").await.unwrap();
        read_n(&mut d, 1, Duration::from_secs(5)).await;
        let reply = api.reset(name, None).await.unwrap();
        assert_eq!(reply.connections_reset, 1);
        assert_eq!(closed_within(&mut d, Duration::from_secs(5)).await, Some(ErrorKind::ConnectionReset));

        // Typed errors.
        let missing = api.heal("nowhere").await.unwrap_err();
        assert_eq!(missing.reason(), Some("LINK_NOT_FOUND"));
        let bad = FaultsPatch { bandwidth_bytes_per_s: Some(3), ..Default::default() };
        assert_eq!(api.set(name, &bad).await.unwrap_err().reason(), Some("INVALID_FAULTS"));
        assert_eq!(api.link(name).await.unwrap().faults.to_upstream.bandwidth_bytes_per_s, 1_000_000);

        control.shutdown().await;
        set.shutdown().await;
    })
    .await;
}
