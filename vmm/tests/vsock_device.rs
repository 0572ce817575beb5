//! The vsock device and hybrid muxer end to end: a fake guest driver on mock virtqueues
//! against real host Unix sockets.

mod support;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixListener;
use std::time::Duration;

use cocoon_vmm::vsock::defs::*;
use cocoon_vmm::vsock::muxer::host_port_path;
use cocoon_vmm::vsock::VsockHeader;
use support::*;
use vm_memory::{Bytes, GuestAddress};

#[test]
fn host_connect_handshake_and_data_both_ways() {
    let mut vm = TestVm::new();
    let mut s = vm.host_connect(1234);
    let req = vm.expect_op(VSOCK_OP_REQUEST);
    assert_eq!(req.hdr.src_cid, VSOCK_HOST_CID);
    assert_eq!(req.hdr.dst_cid, GUEST_CID);
    assert_eq!(req.hdr.dst_port, 1234);
    assert_eq!(req.hdr.type_, VSOCK_TYPE_STREAM);
    assert_eq!(req.hdr.buf_alloc, CONN_TX_BUF_SIZE);
    assert!(req.hdr.src_port >= FIRST_EPHEMERAL_HOST_PORT);
    let host_port = req.hdr.src_port;

    vm.send(hdr(VSOCK_OP_RESPONSE, 1234, host_port), &[]);
    assert_eq!(read_line(&mut s), format!("OK {host_port}\n"));
    assert_eq!(vm.dev.backend().connection_count(), 1);

    s.write_all(b"hello guest").unwrap();
    let rw = vm.expect_op(VSOCK_OP_RW);
    assert_eq!(rw.data, b"hello guest");
    assert_eq!((rw.hdr.src_port, rw.hdr.dst_port), (host_port, 1234));

    vm.send(hdr(VSOCK_OP_RW, 1234, host_port), b"hello host");
    assert_eq!(read_n(&mut s, 10), b"hello host");
}

#[test]
fn bytes_sent_before_ok_reach_the_guest_after_it() {
    let mut vm = TestVm::new();
    let mut s = vm.host_connect(7);
    s.write_all(b"early").unwrap();
    let req = vm.expect_op(VSOCK_OP_REQUEST);
    vm.send(hdr(VSOCK_OP_RESPONSE, 7, req.hdr.src_port), &[]);
    assert_eq!(read_line(&mut s), format!("OK {}\n", req.hdr.src_port));
    assert_eq!(vm.expect_op(VSOCK_OP_RW).data, b"early");
}

#[test]
fn guest_rst_refuses_host_connect() {
    let mut vm = TestVm::new();
    let mut s = vm.host_connect(99);
    let req = vm.expect_op(VSOCK_OP_REQUEST);
    vm.send(hdr(VSOCK_OP_RST, 99, req.hdr.src_port), &[]);
    let mut buf = [0u8; 16];
    assert_eq!(s.read(&mut buf).unwrap(), 0, "stream must close without OK");
    vm.pump();
    assert_eq!(vm.dev.backend().connection_count(), 0);
}

#[test]
fn unanswered_host_connect_times_out() {
    let mut vm = TestVm::with_config(|c| c.connect_timeout = Duration::from_millis(200));
    let mut s = vm.host_connect(99);
    let req = vm.expect_op(VSOCK_OP_REQUEST);
    // The guest never answers: we give up, reset the guest side and close the client.
    let rst = vm.expect_op(VSOCK_OP_RST);
    assert_eq!(rst.hdr.src_port, req.hdr.src_port);
    let mut buf = [0u8; 16];
    assert_eq!(s.read(&mut buf).unwrap(), 0);
    assert_eq!(vm.dev.backend().connection_count(), 0);
}

#[test]
fn bad_connect_lines_are_closed() {
    let mut vm = TestVm::new();
    let bad: [&[u8]; 4] = [
        b"HELLO\n",
        b"CONNECT abc\n",
        b"CONNECT 4294967296\n",
        &[b'x'; 40],
    ];
    for line in bad {
        let mut s = std::os::unix::net::UnixStream::connect(&vm.uds_path).unwrap();
        s.write_all(line).unwrap();
        let mut closed = false;
        s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        for _ in 0..250 {
            vm.pump();
            let mut b = [0u8; 8];
            match s.read(&mut b) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(_) => panic!("got data for a bad CONNECT line"),
                Err(_) => {}
            }
        }
        assert!(closed, "{:?} was not closed", String::from_utf8_lossy(line));
    }
    assert!(vm.drain().is_empty(), "guest must not hear about bad lines");
    assert_eq!(vm.dev.backend().connection_count(), 0);
}

#[test]
fn slow_connect_line_times_out() {
    let mut vm = TestVm::with_config(|c| c.connect_timeout = Duration::from_millis(100));
    let mut s = std::os::unix::net::UnixStream::connect(&vm.uds_path).unwrap();
    s.write_all(b"CONN").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    let deadline = std::time::Instant::now() + DEADLINE;
    loop {
        vm.pump();
        let mut b = [0u8; 8];
        if let Ok(0) = s.read(&mut b) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never closed");
    }
}

#[test]
fn guest_connect_reaches_host_listener() {
    let mut vm = TestVm::new();
    let listener = UnixListener::bind(host_port_path(&vm.uds_path, 5000)).unwrap();
    vm.send(hdr(VSOCK_OP_REQUEST, 7777, 5000), &[]);
    let resp = vm.expect_op(VSOCK_OP_RESPONSE);
    assert_eq!((resp.hdr.src_port, resp.hdr.dst_port), (5000, 7777));
    let (mut s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();

    vm.send(hdr(VSOCK_OP_RW, 7777, 5000), b"ping");
    assert_eq!(read_n(&mut s, 4), b"ping");
    s.write_all(b"pong").unwrap();
    assert_eq!(vm.expect_op(VSOCK_OP_RW).data, b"pong");
}

/// A guest that posts no rx buffers and opens and resets the same connection over and
/// over: each connection goes with its turn in the rx queue, which stays as short as
/// what is really waiting, instead of growing by one per round.
#[test]
fn connections_reset_before_their_turn_leave_no_turn_behind() {
    let mut vm = TestVm::new();
    let listener = UnixListener::bind(host_port_path(&vm.uds_path, 5002)).unwrap();
    listener.set_nonblocking(true).unwrap();
    for _ in 0..100 {
        vm.send(hdr(VSOCK_OP_REQUEST, 7777, 5002), &[]);
        vm.send(hdr(VSOCK_OP_RST, 7777, 5002), &[]);
        while listener.accept().is_ok() {}
    }
    assert_eq!(vm.dev.backend().connection_count(), 0);
    let waiting = vm.dev.backend().rx_queue_len();
    assert!(waiting <= 1, "{waiting} turns wait in the rx queue");
}

#[test]
fn guest_connect_without_listener_is_reset() {
    let mut vm = TestVm::new();
    vm.send(hdr(VSOCK_OP_REQUEST, 7777, 5001), &[]);
    let rst = vm.expect_op(VSOCK_OP_RST);
    assert_eq!((rst.hdr.src_port, rst.hdr.dst_port), (5001, 7777));
    assert_eq!(vm.dev.backend().connection_count(), 0);
}

#[test]
fn host_data_respects_guest_credit() {
    let mut vm = TestVm::new();
    let (mut s, host_port) = vm.establish(80, 100);
    let data: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
    s.write_all(&data).unwrap();

    let mut got = Vec::new();
    while got.len() < 100 {
        got.extend(vm.expect_op(VSOCK_OP_RW).data);
    }
    assert_eq!(got.len(), 100, "sent beyond the guest's buf_alloc");
    assert!(
        vm.drain().iter().all(|p| p.hdr.op != VSOCK_OP_RW),
        "sent without credit"
    );

    // The guest consumed 100 bytes and says so: another 100 may come.
    let mut upd = hdr(VSOCK_OP_CREDIT_UPDATE, 80, host_port);
    upd.buf_alloc = 100;
    upd.fwd_cnt = 100;
    vm.send(upd, &[]);
    while got.len() < 200 {
        got.extend(vm.expect_op(VSOCK_OP_RW).data);
    }
    assert_eq!(got.len(), 200);
    assert!(vm.drain().iter().all(|p| p.hdr.op != VSOCK_OP_RW));
    assert_eq!(got, data[..200]);
}

#[test]
fn credit_request_is_answered() {
    let mut vm = TestVm::new();
    let (mut s, host_port) = vm.establish(80, 4096);
    vm.send(hdr(VSOCK_OP_RW, 80, host_port), b"12345");
    assert_eq!(read_n(&mut s, 5), b"12345");
    vm.drain();
    vm.send(hdr(VSOCK_OP_CREDIT_REQUEST, 80, host_port), &[]);
    let upd = vm.expect_op(VSOCK_OP_CREDIT_UPDATE);
    assert_eq!(upd.hdr.buf_alloc, CONN_TX_BUF_SIZE);
    assert_eq!(upd.hdr.fwd_cnt, 5);
}

#[test]
fn credit_update_sent_when_guest_runs_low() {
    let mut vm = TestVm::new();
    let (mut s, host_port) = vm.establish(80, 4096);
    // The guest uses its whole credit while the host client is not reading.
    let chunk: Vec<u8> = (0..MAX_PKT_PAYLOAD).map(|i| (i % 251) as u8).collect();
    let total = CONN_TX_BUF_SIZE as usize;
    for _ in 0..total / MAX_PKT_PAYLOAD {
        vm.send(hdr(VSOCK_OP_RW, 80, host_port), &chunk);
    }
    // As the host reads, freed space must be reported until the guest's view of our
    // free space is above the threshold again, so it can keep sending.
    let mut got = Vec::new();
    let mut updates = 0;
    let mut last_fwd = 0;
    s.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
    let deadline = std::time::Instant::now() + DEADLINE;
    while got.len() < total {
        let mut buf = [0u8; 65536];
        if let Ok(n) = s.read(&mut buf) {
            got.extend_from_slice(&buf[..n]);
        }
        vm.pump();
        for p in vm.inbox.drain(..) {
            assert_eq!(p.hdr.op, VSOCK_OP_CREDIT_UPDATE);
            assert!(p.hdr.fwd_cnt >= last_fwd);
            last_fwd = p.hdr.fwd_cnt;
            updates += 1;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "host never got the data"
        );
    }
    for p in vm.drain() {
        assert_eq!(p.hdr.op, VSOCK_OP_CREDIT_UPDATE);
        last_fwd = p.hdr.fwd_cnt;
        updates += 1;
    }
    assert!(
        updates >= 1,
        "no credit update while the guest was out of credit"
    );
    let guest_view_free = CONN_TX_BUF_SIZE - (total as u32 - last_fwd);
    assert!(
        guest_view_free >= CREDIT_UPDATE_THRESHOLD,
        "guest left starved"
    );
    assert!(got.chunks(MAX_PKT_PAYLOAD).all(|c| c == &chunk[..]));
}

#[test]
fn guest_exceeding_credit_is_reset() {
    let mut vm = TestVm::new();
    let (mut s, host_port) = vm.establish(80, 4096);
    let chunk = vec![7u8; MAX_PKT_PAYLOAD];
    // The host never reads: once the socket and our buffer are full, the next packet
    // overruns the credit we gave.
    let mut reset = false;
    for _ in 0..64 {
        vm.send(hdr(VSOCK_OP_RW, 80, host_port), &chunk);
        if vm.drain().iter().any(|p| p.hdr.op == VSOCK_OP_RST) {
            reset = true;
            break;
        }
    }
    assert!(reset, "credit overrun not reset");
    assert!(sees_eof(&mut s));
    assert_eq!(vm.dev.backend().connection_count(), 0);
}

#[test]
fn guest_rst_closes_host_stream() {
    let mut vm = TestVm::new();
    let (mut s, host_port) = vm.establish(80, 4096);
    vm.send(hdr(VSOCK_OP_RST, 80, host_port), &[]);
    assert!(sees_eof(&mut s));
    assert!(vm.drain().is_empty(), "a reset must not be answered");
    assert_eq!(vm.dev.backend().connection_count(), 0);
}

#[test]
fn guest_full_shutdown_closes_and_resets() {
    let mut vm = TestVm::new();
    let (mut s, host_port) = vm.establish(80, 4096);
    vm.send(hdr(VSOCK_OP_RW, 80, host_port), b"last words");
    let mut sd = hdr(VSOCK_OP_SHUTDOWN, 80, host_port);
    sd.flags = VSOCK_FLAGS_SHUTDOWN_BOTH;
    vm.send(sd, &[]);
    vm.expect_op(VSOCK_OP_RST);
    assert_eq!(read_n(&mut s, 10), b"last words");
    assert!(sees_eof(&mut s));
    assert_eq!(vm.dev.backend().connection_count(), 0);
}

#[test]
fn guest_half_close_keeps_host_to_guest_open() {
    let mut vm = TestVm::new();
    let (mut s, host_port) = vm.establish(80, 4096);
    let mut sd = hdr(VSOCK_OP_SHUTDOWN, 80, host_port);
    sd.flags = VSOCK_FLAGS_SHUTDOWN_SEND;
    vm.send(sd, &[]);
    let mut b = [0u8; 4];
    assert_eq!(s.read(&mut b).unwrap(), 0, "guest's send side is shut");
    s.write_all(b"reply").unwrap();
    assert_eq!(vm.expect_op(VSOCK_OP_RW).data, b"reply");
    assert_eq!(vm.dev.backend().connection_count(), 1);
}

#[test]
fn host_close_shuts_down_guest_side() {
    let mut vm = TestVm::new();
    let (s, host_port) = vm.establish(80, 4096);
    drop(s);
    let sd = vm.expect_op(VSOCK_OP_SHUTDOWN);
    assert_eq!(sd.hdr.flags, VSOCK_FLAGS_SHUTDOWN_BOTH);
    vm.send(hdr(VSOCK_OP_RST, 80, host_port), &[]);
    vm.pump();
    assert_eq!(vm.dev.backend().connection_count(), 0);
}

#[test]
fn host_close_without_guest_rst_times_out() {
    let mut vm = TestVm::with_config(|c| c.connect_timeout = Duration::from_millis(100));
    let (s, _) = vm.establish(80, 4096);
    drop(s);
    vm.expect_op(VSOCK_OP_SHUTDOWN);
    vm.expect_op(VSOCK_OP_RST);
    assert_eq!(vm.dev.backend().connection_count(), 0);
}

#[test]
fn host_half_close_lets_guest_keep_sending() {
    let mut vm = TestVm::new();
    let (mut s, host_port) = vm.establish(80, 4096);
    s.shutdown(Shutdown::Write).unwrap();
    let sd = vm.expect_op(VSOCK_OP_SHUTDOWN);
    assert_eq!(sd.hdr.flags, VSOCK_FLAGS_SHUTDOWN_SEND);
    vm.send(hdr(VSOCK_OP_RW, 80, host_port), b"answer");
    assert_eq!(read_n(&mut s, 6), b"answer");
}

#[test]
fn connection_limit_is_enforced() {
    let mut vm = TestVm::with_config(|c| c.max_connections = 2);
    let _a = vm.establish(1, 4096);
    let _b = vm.establish(2, 4096);
    let mut c = vm.host_connect(3);
    vm.pump();
    assert!(sees_eof(&mut c), "third client must be refused");
    // A guest request over the limit is reset as well.
    let _l = UnixListener::bind(host_port_path(&vm.uds_path, 9)).unwrap();
    vm.send(hdr(VSOCK_OP_REQUEST, 50, 9), &[]);
    vm.expect_op(VSOCK_OP_RST);
    assert_eq!(vm.dev.backend().connection_count(), 2);
}

// ---- malformed guest packets ----

fn write_hdr(vm: &mut TestVm, h: &VsockHeader) -> u64 {
    let addr = vm.alloc(VSOCK_HDR_SIZE);
    vm.mem
        .write_slice(&h.to_bytes(), GuestAddress(addr))
        .unwrap();
    addr
}

#[test]
fn header_len_beyond_chain_is_dropped() {
    let mut vm = TestVm::new();
    let mut h = hdr(VSOCK_OP_REQUEST, 1, 2);
    h.len = 100;
    let haddr = write_hdr(&mut vm, &h);
    let daddr = vm.alloc(10);
    assert_eq!(vm.send_raw(&[(haddr, 44, 0), (daddr, 10, 0)]), 1);
    assert_eq!(vm.dev.stats().tx_malformed, 1);
    assert!(vm.drain().is_empty());
}

#[test]
fn header_len_over_limit_is_dropped() {
    let mut vm = TestVm::new();
    let mut h = hdr(VSOCK_OP_RW, 1, 2);
    h.len = u32::MAX;
    let haddr = write_hdr(&mut vm, &h);
    assert_eq!(vm.send_raw(&[(haddr, 44, 0), (haddr, u32::MAX, 0)]), 1);
    assert_eq!(vm.dev.stats().tx_malformed, 1);
}

#[test]
fn short_header_is_dropped() {
    let mut vm = TestVm::new();
    let haddr = write_hdr(&mut vm, &hdr(VSOCK_OP_REQUEST, 1, 2));
    assert_eq!(vm.send_raw(&[(haddr, 20, 0)]), 1);
    assert_eq!(vm.dev.stats().tx_malformed, 1);
    // A device-writable descriptor does not count as packet data either.
    assert_eq!(vm.send_raw(&[(haddr, 44, 2)]), 1);
    assert_eq!(vm.dev.stats().tx_malformed, 2);
    assert!(vm.drain().is_empty());
}

#[test]
fn header_split_across_descriptors_is_accepted() {
    let mut vm = TestVm::new();
    let haddr = write_hdr(&mut vm, &hdr(VSOCK_OP_REQUEST, 1, 2));
    assert_eq!(vm.send_raw(&[(haddr, 20, 0), (haddr + 20, 24, 0)]), 1);
    assert_eq!(vm.dev.stats().tx_malformed, 0);
    // Nothing listens on port 2: the well-formed request is refused.
    vm.expect_op(VSOCK_OP_RST);
}

#[test]
fn out_of_range_guest_address_is_dropped() {
    let mut vm = TestVm::new();
    assert_eq!(vm.send_raw(&[(BAD_ADDR, 44, 0)]), 1);
    let haddr = write_hdr(&mut vm, &{
        let mut h = hdr(VSOCK_OP_RW, 1, 2);
        h.len = 8;
        h
    });
    assert_eq!(vm.send_raw(&[(haddr, 44, 0), (BAD_ADDR, 8, 0)]), 1);
    // Straddling the end of guest memory.
    assert_eq!(vm.send_raw(&[(MEM_SIZE as u64 - 8, 44, 0)]), 1);
    assert_eq!(vm.dev.stats().tx_malformed, 3);
    assert!(vm.drain().is_empty());
}

#[test]
fn wrong_cids_are_dropped_without_reply() {
    let mut vm = TestVm::new();
    let mut h = hdr(VSOCK_OP_REQUEST, 1, 2);
    h.src_cid = 4;
    vm.send(h, &[]);
    let mut h = hdr(VSOCK_OP_REQUEST, 1, 2);
    h.dst_cid = 5;
    vm.send(h, &[]);
    assert_eq!(vm.dev.stats().tx_malformed, 2);
    assert_eq!(vm.dev.stats().tx_packets, 0);
    assert!(vm.drain().is_empty());
}

#[test]
fn wrong_type_is_reset_without_connecting() {
    let mut vm = TestVm::new();
    let listener = UnixListener::bind(host_port_path(&vm.uds_path, 6000)).unwrap();
    listener.set_nonblocking(true).unwrap();
    let mut h = hdr(VSOCK_OP_REQUEST, 1, 6000);
    h.type_ = 2;
    vm.send(h, &[]);
    vm.expect_op(VSOCK_OP_RST);
    assert!(
        listener.accept().is_err(),
        "must not connect for a bad type"
    );
}

#[test]
fn unknown_op_is_reset() {
    let mut vm = TestVm::new();
    // Without a connection: refused.
    vm.send(hdr(99, 1, 2), &[]);
    vm.expect_op(VSOCK_OP_RST);
    // On a connection: the connection is reset.
    let (mut s, host_port) = vm.establish(80, 4096);
    vm.send(hdr(0, 80, host_port), &[]);
    let rst = vm.expect_op(VSOCK_OP_RST);
    assert_eq!(rst.hdr.src_port, host_port);
    assert!(sees_eof(&mut s));
    assert_eq!(vm.dev.backend().connection_count(), 0);
}

#[test]
fn data_for_unknown_connection_is_reset() {
    let mut vm = TestVm::new();
    vm.send(hdr(VSOCK_OP_RW, 1, 2), b"stray");
    let rst = vm.expect_op(VSOCK_OP_RST);
    assert_eq!((rst.hdr.src_port, rst.hdr.dst_port), (2, 1));
}

#[test]
fn unusable_rx_buffers_are_skipped() {
    let mut vm = TestVm::new();
    vm.send(hdr(VSOCK_OP_REQUEST, 1, 2), &[]);
    // Too small for a header, then outside guest memory, then a good one.
    vm.post_rx(20);
    vm.post_rx_at(BAD_ADDR, 4096);
    vm.post_rx(4096);
    vm.pump_with(0);
    assert_eq!(vm.dev.stats().rx_bad_buffers, 2);
    assert_eq!(vm.inbox.len(), 1);
    assert_eq!(vm.inbox[0].hdr.op, VSOCK_OP_RST);
}

#[test]
fn small_rx_buffers_split_host_data() {
    let mut vm = TestVm::new();
    let (mut s, _) = vm.establish(80, 1 << 20);
    let data: Vec<u8> = (0..10_000u32).map(|i| (i % 253) as u8).collect();
    s.write_all(&data).unwrap();
    let mut got = Vec::new();
    while got.len() < data.len() {
        let p = vm.expect_op(VSOCK_OP_RW);
        assert!(p.data.len() <= 4096 - VSOCK_HDR_SIZE);
        got.extend(p.data);
    }
    assert_eq!(got, data);
}

#[test]
fn corrupt_avail_ring_does_not_hang() {
    let mut vm = TestVm::new();
    // Claim far more available entries than the queue holds.
    let avail = 0x1_0000 + 16 * u64::from(QSIZE);
    vm.mem
        .write_obj(1000u16.to_le(), GuestAddress(avail + 2))
        .unwrap();
    vm.dev.process_tx(&mut vm.txq, &vm.mem).unwrap();
    assert_eq!(vm.dev.stats().tx_packets, 0);
}
