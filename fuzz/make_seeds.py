#!/usr/bin/env python3
"""Writes the hand-made seed inputs of fuzz/corpus/. Rerun after a change
of the input formats (engine/src/testkit/fuzz/); the encodings below follow
`Call::decode` in spi_calls.rs, `Descriptor` in mem/descriptor.rs and
`Message` in switch/proto/wire.rs."""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def u16(v):
    return struct.pack("<H", v)


def u32(v):
    return struct.pack("<I", v)


# --- spi_calls ---------------------------------------------------------
# Socket arguments: an index into every descriptor handed out (a Pair on a
# fresh program makes 0 = listener (closed), 1 = client, 2 = server).
RAW0, RAWINV = 0xF0, 0xF1
OWN, ANY, TCPONLY, UNKNOWN, OTHERNET, BCAST = 0, 3, 4, 5, 6, 7
READ, WRITE, RW = 0, 2, 4


def socket():
    return bytes([0, 0])


def bind(s, ip, port):  # port: 1..5 -> 7001..7005, 0 -> ephemeral
    return bytes([1, s, ip, port])


def listen(s, backlog=1):
    return bytes([2, s, backlog])


def connect(s, ip, port):
    return bytes([3, s, ip, port, 0])


def accept(s, cond=0):  # 0 accept, 5 reject, 7 defer
    return bytes([4, s, cond])


def event_select(s, ev, mask):  # mask: 0 FD_ACCEPT, 1 FD_CONNECT, 3 none
    return bytes([5, s, ev, mask])


def enum_events(s, ev=0):
    return bytes([6, s, ev])


def rng(off, length, kind=0):
    return bytes([kind]) + u16(off) + u16(length)


def register(s, off, length, flags=RW):
    return bytes([7, s]) + rng(off, length) + bytes([flags])


def deregister(s, h):
    return bytes([8, s, h])


def register_rdma(s, off, length, flags=RW):
    return bytes([9, s]) + rng(off, length) + bytes([flags, 0])


def deregister_rdma(s, d):
    return bytes([10, s, d, 0])


def cache_callback(off, length):
    return bytes([11]) + rng(off, length)


def bufs(items, handles=False):
    out = bytes([len(items)])
    for off, length, h in items:
        out += bytes([0]) + u16(off) + u16(length)
        if handles:
            out += bytes([h])
    return out


def send(s, items, poll=False):
    return bytes([12, s]) + bufs(items) + bytes([1 if poll else 0])


def recv(s, items, poll=False):
    return bytes([14, s]) + bufs(items) + bytes([1 if poll else 0])


def rdma(s, items, desc, offset, write=True, poll=False):
    f = (0 if write else 2) | (1 if poll else 0)
    return bytes([16, s]) + bufs(items, True) + bytes([desc, 0, f]) + u16(offset)


def opt(level, name):  # level 3: a raw level byte follows; name 8, 9: a raw u16
    out = bytes([level]) + (bytes([0x29]) if level == 3 else b"") + bytes([name])
    return out + (u16(0x1234) if name in (8, 9) else b"")


def getopt(s, level, name, length=4):
    return bytes([17, s]) + opt(level, name) + bytes([length])


def setopt(s, level, name, value, length=4):
    return bytes([18, s]) + opt(level, name) + u32(value) + bytes([length])


def result(op):
    return bytes([19, op, 0])


def progress():
    return bytes([20, 0])


def close(s):
    return bytes([21, s])


def query(s, what, guid=0):
    return bytes([22, s, what, guid])


def startup():
    return bytes([23, 0])


def cleanup():
    return bytes([23, 1])


def pair(p=2):
    return bytes([23, p])


SPI = {
    "send_recv": bytes([0]) + pair() + register(1, 0, 4096) + register(2, 4096, 4096)
    + recv(2, [(4096, 100, 0)]) + recv(2, [(4096 + 512, 64, 0), (4096 + 1024, 64, 0)], poll=True)
    + send(1, [(0, 100, 0)]) + send(1, [(0, 10, 0), (200, 20, 0)], poll=True)
    + progress() + result(0) + result(1) + result(3) + close(1) + close(2),
    "rdma": bytes([0]) + pair() + register(1, 0, 4096) + register_rdma(2, 8192, 4096)
    + rdma(1, [(0, 64, 0)], 0, 16) + rdma(1, [(128, 32, 0), (256, 32, 0)], 0, 100, write=False, poll=True)
    + rdma(1, [(0, 64, 0)], 0, 4090) + progress() + deregister_rdma(2, 0) + deregister(1, 0)
    + close(2) + close(1),
    "close_pending": bytes([0]) + pair() + register(1, 0, 8192) + register(2, 8192, 8192)
    + recv(1, [(0, 64, 0)]) + recv(1, [(64, 64, 0)], poll=True) + recv(2, [(8192, 64, 0)])
    + register_rdma(1, 1024, 1024) + rdma(2, [(8192, 16, 1)], 0, 0) + close(1) + progress()
    + recv(2, [(8192, 8, 0)]) + result(0) + close(2),
    "listen_events": bytes([0]) + socket() + bind(0, OWN, 1) + listen(0, 2) + event_select(0, 0, 0)
    + socket() + event_select(1, 1, 1) + connect(1, OWN, 1) + enum_events(0) + accept(0, 5)
    + enum_events(1, 1) + connect(1, OWN, 1) + accept(0, 7) + accept(0, 0) + enum_events(1, 1)
    + socket() + connect(3, ANY, 1) + connect(3, OWN, 2) + close(0) + close(1) + close(2) + close(3),
    "connect_errors": bytes([0]) + socket() + connect(0, TCPONLY, 3) + connect(0, TCPONLY, 3)
    + socket() + connect(1, UNKNOWN, 3) + connect(1, OTHERNET, 3) + connect(1, BCAST, 3)
    + bind(1, TCPONLY, 1) + bind(1, ANY, 0) + bind(1, ANY, 0) + listen(1) + listen(1)
    + connect(1, OWN, 4) + close(0) + socket() + connect(2, TCPONLY, 4),
    "bad_args": bytes([0]) + bind(RAW0, OWN, 1) + close(RAWINV) + bytes([0, 0xE7, 1, 2, 3, 4])
    + socket() + getopt(0, 0, 0) + getopt(0, 0, 2) + getopt(0, 2, 5, 2) + getopt(0, 3, 9)
    + setopt(0, 0, 2, 7) + setopt(0, 2, 5, 1, 1) + setopt(0, 0, 6, 1) + setopt(0, 0, 4, 0, 0)
    + query(0, 0, 0) + query(0, 0, 6) + query(0, 0, 8) + query(0, 1) + query(0, 2) + query(0, 3)
    + query(0, 4) + query(0, 5) + register(0, 0, 64) + send(0, [(0, 8, 0)]) + close(0) + close(0)
    + query(0, 4) + startup() + cleanup() + cleanup() + cleanup() + socket() + close(0) + startup()
    + socket(),
    "cache": bytes([1]) + pair() + register(1, 0, 4096) + deregister(1, 0) + register(1, 0, 4096)
    + deregister(1, 1) + cache_callback(100, 1) + register(1, 0, 4096)
    + register(2, 0, 4096, READ) + register_rdma(2, 4096, 4096) + deregister_rdma(2, 0)
    + register_rdma(2, 4096, 4096) + cache_callback(0, 100) + cache_callback(12000, 10)
    + deregister(2, 2) + close(1) + close(2),
    "exhaustion": bytes([2]) + pair(3) + pair(4) + pair(5) + socket() * 6
    + register(1, 0, 16384) + register(2, 0, 16384)
    + b"".join(recv(2, [(i * 64, 64, 0)]) for i in range(6))
    + b"".join(send(1, [(i * 64, 64, 0)]) for i in range(8)) + progress(),
    "cleanup_pending": bytes([0]) + startup() + pair() + register(1, 0, 4096) + register(2, 4096, 4096)
    + recv(1, [(0, 32, 0)]) + recv(2, [(4096, 32, 0)], poll=True) + cleanup() + send(1, [(0, 8, 0)])
    + cleanup() + send(1, [(0, 8, 0)]) + startup() + pair(6) + register(4, 0, 64) + recv(4, [(0, 64, 0)]),
}

# --- descriptor ---------------------------------------------------------


def desc(rkey, addr, length, gen, magic=0x53504401, reserved=0):
    return u32(magic) + u32(rkey) + struct.pack("<QQ", addr, length) + u32(gen) + u32(reserved)


DESC = {
    "valid": desc(0x10001, 0x7F00_0000_1000, 4096, 1),
    "valid_with_target": desc(7, 4096, 100, 3) + struct.pack("<QQ", 60, 40),
    "target_overflow": desc(7, 2**64 - 10, 2**64 - 1, 3) + struct.pack("<QQ", 20, 0),
    "short": desc(1, 2, 3, 4)[:31],
    "bad_version": desc(1, 2, 3, 4, magic=0x53504402),
    "reserved_set": desc(1, 2, 3, 4, reserved=1),
    "empty": b"",
}

# --- session_msg --------------------------------------------------------
# Records: u16 received byte count, then the head (up to 68 bytes); see
# session_msg.rs. Messages follow `Message::encode` in switch/proto/wire.rs
# (protocol version 2: 20-byte header ending in the ring ack; HELLO
# announces the receive ring; DATA names a ring offset, no payload; INLINE's
# payload follows the header).
K_HELLO, K_DATA, K_CREDIT, K_READ_OFFER, K_READ_DONE = 1, 2, 3, 4, 5
K_WRITE_REQUEST, K_WRITE_TARGET, K_WRITE_DONE, K_FIN, K_NEED, K_CREDIT_ACK = 6, 7, 8, 9, 10, 11
K_INLINE = 12
HEADER_LEN = 20
MAX_HEAD = 68
MIN_RING = 4096


def msg(kind, seq, credits=0, length=0, body=b"", magic=b"SW", version=2, reserved=0, ack=0):
    return (magic + bytes([version, kind]) + u16(credits) + u16(reserved) + u32(seq)
            + u32(length) + u32(ack) + body)


def rec(m, n=None):
    n = len(m) if n is None else n
    return u16(n) + m[:min(MAX_HEAD, max(n, 1))]


def hello(seq=0, slots=4, size=256, caps=1, ring=MIN_RING, version=2):
    body = u32(slots) + u32(size) + u32(caps) + u32(ring) + bytes(range(32))
    return rec(msg(K_HELLO, seq, body=body, version=version))


def data(seq, offset, length, ack=0):
    return rec(msg(K_DATA, seq, length=length, body=u32(offset), ack=ack))


def inline(seq, length, n=None):
    m = msg(K_INLINE, seq, length=length) + bytes(i & 0xFF for i in range(length))
    return rec(m, n)


DESC32 = desc(7, 4096, 4096, 3)
SESSION = {
    "hello_data_fin": hello() + data(1, 0, 10) + data(2, 10, 5) + rec(msg(K_FIN, 3)),
    "read_offer": hello() + rec(msg(K_READ_OFFER, 1, length=3000, body=DESC32)) + rec(msg(K_FIN, 2)),
    "write_flow": hello(caps=0) + rec(msg(K_WRITE_REQUEST, 1, length=3000))
    + rec(msg(K_WRITE_TARGET, 2, length=700, body=DESC32)) + rec(msg(K_WRITE_DONE, 3, length=700)),
    "credits": hello(slots=1) + rec(msg(K_NEED, 1)) + rec(msg(K_CREDIT, 2, credits=3))
    + rec(msg(K_CREDIT_ACK, 3, credits=60000)),
    "out_of_sequence": hello() + data(5, 0, 1),
    "data_before_hello": data(0, 0, 1) + hello(),
    "too_long": hello() + data(1, 0, 10) + rec(msg(K_DATA, 2, length=10, body=u32(10)), n=4016),
    "length_mismatch": hello() + rec(msg(K_DATA, 1, length=10, body=u32(0)), n=20),
    "bad_magic": rec(msg(K_HELLO, 0, magic=b"XX", body=u32(4) + u32(256) + u32(0))),
    "reserved_set": rec(msg(K_FIN, 0, reserved=1)),
    "truncated": u16(40) + b"SW\x02",
    "empty": b"",
    # Version 1 (16-byte header, no ring) and an unknown future version.
    "other_version": hello(version=1) + hello(version=3),
    # Ring indices: the wrong offset, past the free space, across the end,
    # an ack of bytes never written, a ring below the minimum.
    "bogus_ring_offset": hello() + data(1, 0, 100) + data(2, 7, 100),
    "ring_overflow": hello() + data(1, 0, 4000) + data(2, 4000, 96) + data(3, 0, 1),
    "ring_across_end": hello() + data(1, 0, 4000) + data(2, 4000, 200),
    "ring_ack_beyond": hello() + rec(msg(K_CREDIT, 1, ack=5000)),
    "small_ring": hello(ring=MIN_RING - 1) + data(1, 0, 1),
    "ring_wraps": hello() + data(1, 0, 4000) + data(2, 4000, 96) + rec(msg(K_CREDIT, 3, credits=1))
    + data(4, 0, 50),
    # INLINE: mixed with ring DATA in order, the largest a 256-byte buffer
    # takes, one byte more, a length the byte count disagrees with, after
    # FIN.
    "inline_mixed": hello() + inline(1, 10) + data(2, 0, 300) + inline(3, 256 - HEADER_LEN)
    + rec(msg(K_FIN, 4)),
    "inline_too_long": hello() + inline(1, 256 - HEADER_LEN + 1),
    "inline_length_mismatch": hello() + inline(1, 10, n=HEADER_LEN + 9),
    "inline_after_fin": hello() + rec(msg(K_FIN, 1)) + inline(2, 5),
}

# --- shm_cell -----------------------------------------------------------
# A whole segment (engine/src/fabric/shm/seg.rs, layout version 3): a
# 128-byte header line (magic "SANPSHM1", version, cells, stride), three
# 128-byte control lines (state u32 and refused u64 at 8; busy; armed), then
# the ring (engine/src/fabric/soft/cell.rs, RingLayout): `cells` cells of
# 192 bytes (seq u64, len u32, nsge u32 = count | tag << 24, ack u64,
# 168 payload bytes), `cells * stride` gather entries of 16 bytes (addr
# u64, len u32, lkey u32), padded to 128, then a 128-byte consumed line.


def u64(v):
    return struct.pack("<Q", v)


def seg_header(cells, stride, magic=b"SANPSHM1", version=3, state=0, refused=0):
    line = magic + u32(version) + u32(cells) + u32(stride)
    control = (u32(state) + bytes(4) + u64(refused)).ljust(128, b"\0") + bytes(256)
    return line.ljust(128, b"\0") + control


def cell(seq, length, nsge=0, tag=0, payload=b"", ack=0):
    head = u64(seq) + u32(length) + u32(nsge | tag << 24) + u64(ack)
    return head + payload.ljust(168, b"\0")


def gather(addr, length, lkey=1):
    return u64(addr) + u32(length) + u32(lkey)


def segment(cells, stride, cell_list, gathers, **hdr):
    ring = b"".join(cell_list).ljust(cells * 192, b"\0")
    g = b"".join(gathers).ljust(cells * stride * 16, b"\0")
    body = ring + g
    body = body.ljust((len(body) + 127) // 128 * 128, b"\0") + bytes(128)
    return seg_header(cells, stride, **hdr) + body


RDMA = u64(0x7000_0000) + u32(0x12345)
SHM = {
    "inline_then_gathered": segment(
        4, 2,
        [cell(1, 8, payload=b"pingpong"), cell(2, 300, nsge=2)],
        [bytes(32) * 1, gather(0x1000, 100), gather(0x2000, 200)],
    ),
    "rdma_write_read": segment(
        4, 1,
        [cell(1, 64, nsge=1, tag=1, payload=RDMA), cell(2, 64, nsge=1, tag=2, payload=RDMA)],
        [gather(0x3000, 64), gather(0x4000, 64)],
    ),
    "wrapped_lap": segment(2, 1, [cell(3, 1, payload=b"x"), cell(2, 1, payload=b"y")], []),
    "inline_too_long": segment(2, 1, [cell(1, 169)], []),
    "too_many_entries": segment(2, 1, [cell(1, 10, nsge=2)], []),
    "gather_total_mismatch": segment(2, 1, [cell(1, 300, nsge=1)], [gather(0x1000, 299)]),
    "bad_tag": segment(2, 1, [cell(1, 8, tag=9)], []),
    "bad_magic": segment(2, 1, [cell(1, 8)], [], magic=b"SANPSHM0"),
    "bad_version": segment(2, 1, [cell(1, 8)], [], version=1),
    # Acknowledgements (any value, the largest wins) and a broken peer's
    # control words, `refused` naming no message (index + 1 of 0).
    "acks_and_refused": segment(
        4, 1,
        [cell(1, 8, ack=5), cell(2, 8, ack=2**64 - 1), cell(3, 8, ack=0)],
        [], state=2, refused=0x12,
    ),
    "not_power_of_two": segment(3, 1, [cell(1, 8)], []),
    "huge_geometry": seg_header(1 << 30, 255),
    "truncated": segment(4, 2, [cell(1, 8)], [])[:600],
    "empty": b"",
}

for target, seeds in (("spi_calls", SPI), ("descriptor", DESC), ("session_msg", SESSION),
                      ("shm_cell", SHM)):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    for name, data in seeds.items():
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
