//! Fuzz target `descriptor`: the RDMA descriptor is untrusted bytes the peer's
//! switch hands to `WSPRdmaWrite/WSPRdmaRead` (spec §7-1).

use crate::error::WsaError;
use crate::mem::descriptor::{Descriptor, DESCRIPTOR_LEN};

/// Decodes `data` as a descriptor. Never panics on its own account; checks
/// that a successful decode round-trips through `encode` (the encoding is
/// exactly the first [`DESCRIPTOR_LEN`] bytes), that failures carry the
/// documented codes, and that [`Descriptor::target`] (with an offset and a
/// length taken from the bytes after the descriptor) stays in bounds.
pub fn descriptor(data: &[u8]) {
    let d = match Descriptor::decode(data) {
        Ok(d) => d,
        Err(e) => {
            let want = if data.len() < DESCRIPTOR_LEN {
                WsaError::WSAEFAULT
            } else {
                WsaError::WSAEINVAL
            };
            assert_eq!(e, want, "decode error for {} bytes", data.len());
            return;
        }
    };
    assert!(data.len() >= DESCRIPTOR_LEN, "decoded a short descriptor");
    let bytes = d.encode();
    assert_eq!(
        &bytes[..],
        &data[..DESCRIPTOR_LEN],
        "encode(decode(x)) != x"
    );
    assert_eq!(Descriptor::decode(&bytes), Ok(d), "decode(encode(d)) != d");

    let tail = &data[DESCRIPTOR_LEN..];
    let word = |i: usize| -> u64 {
        let mut w = [0u8; 8];
        for (j, b) in w.iter_mut().enumerate() {
            *b = tail.get(i * 8 + j).copied().unwrap_or(0);
        }
        u64::from_le_bytes(w)
    };
    let (offset, len) = (word(0), word(1));
    match d.target(offset, len) {
        Ok(addr) => {
            let end = offset
                .checked_add(len)
                .expect("target accepted an overflow");
            assert!(end <= d.len, "target beyond the exposed range");
            assert_eq!(Some(addr), d.addr.checked_add(offset));
        }
        Err(e) => {
            assert_eq!(e, WsaError::WSAEINVAL);
            let fits = offset.checked_add(len).is_some_and(|end| end <= d.len)
                && d.addr.checked_add(offset).is_some();
            assert!(!fits, "target refused an access that fits");
        }
    }
}
