//! The RDMA buffer descriptor (spec §7-1).
//!
//! `WSPRegisterRdmaMemory` writes it into a block the switch allocated; the
//! switch copies the bytes opaquely into a control message, and the peer's
//! switch hands them unchanged to its provider's `WSPRdmaWrite/WSPRdmaRead`.
//! It is therefore self-contained and position-independent, and it is
//! untrusted input on the receiving side: [`Descriptor::decode`] validates
//! every field it can and never panics.
//!
//! Layout, 32 bytes, little-endian:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic and version ([`DESCRIPTOR_MAGIC`]; the low byte is the version) |
//! | 4 | 4 | remote key (bound to one queue pair) |
//! | 8 | 8 | remote address of the exposed range |
//! | 16 | 8 | length of the exposed range |
//! | 24 | 4 | generation of the exposure (detects stale descriptors whose remote key was reused) |
//! | 28 | 4 | reserved, 0 |

use crate::error::{WsaError, WsaResult};

/// Bytes of an encoded descriptor.
pub const DESCRIPTOR_LEN: usize = 32;

/// Format version, the low byte of [`DESCRIPTOR_MAGIC`].
pub const DESCRIPTOR_VERSION: u8 = 1;

/// First word of every descriptor: `"SPD"` tag in the upper three bytes,
/// [`DESCRIPTOR_VERSION`] in the low byte.
pub const DESCRIPTOR_MAGIC: u32 = 0x5350_4400 | DESCRIPTOR_VERSION as u32;

/// A decoded RDMA buffer descriptor: what the peer needs to reach an exposed
/// range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Descriptor {
    /// Remote key, valid only on the connection it was registered for.
    pub rkey: u32,
    /// Start of the exposed range in the exposing process.
    pub addr: u64,
    /// Length of the exposed range.
    pub len: u64,
    /// Generation of the exposure that produced this descriptor.
    pub generation: u32,
}

impl Descriptor {
    /// The wire form.
    pub fn encode(&self) -> [u8; DESCRIPTOR_LEN] {
        let mut out = [0u8; DESCRIPTOR_LEN];
        out[0..4].copy_from_slice(&DESCRIPTOR_MAGIC.to_le_bytes());
        out[4..8].copy_from_slice(&self.rkey.to_le_bytes());
        out[8..16].copy_from_slice(&self.addr.to_le_bytes());
        out[16..24].copy_from_slice(&self.len.to_le_bytes());
        out[24..28].copy_from_slice(&self.generation.to_le_bytes());
        // 28..32: reserved, already 0.
        out
    }

    /// Parses the first [`DESCRIPTOR_LEN`] bytes; trailing bytes (a larger
    /// block than needed) are ignored. Shorter input → `WSAEFAULT`; wrong
    /// magic or version, or a non-zero reserved word → `WSAEINVAL`.
    pub fn decode(bytes: &[u8]) -> WsaResult<Descriptor> {
        let Some(b) = bytes.first_chunk::<DESCRIPTOR_LEN>() else {
            return Err(WsaError::WSAEFAULT);
        };
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| u64::from(u32_at(i)) | u64::from(u32_at(i + 4)) << 32;
        if u32_at(0) != DESCRIPTOR_MAGIC || u32_at(28) != 0 {
            return Err(WsaError::WSAEINVAL);
        }
        Ok(Descriptor {
            rkey: u32_at(4),
            addr: u64_at(8),
            len: u64_at(16),
            generation: u32_at(24),
        })
    }

    /// The remote address for an access of `len` bytes at `offset` into the
    /// exposed range; `WSAEINVAL` if the access does not fit in the range
    /// (including arithmetic overflow).
    pub fn target(&self, offset: u64, len: u64) -> WsaResult<u64> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => {
                self.addr.checked_add(offset).ok_or(WsaError::WSAEINVAL)
            }
            _ => Err(WsaError::WSAEINVAL),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn layout_is_fixed_little_endian() {
        let d = Descriptor {
            rkey: 0x0403_0201,
            addr: 0x1817_1615_1413_1211,
            len: 0x2827_2625_2423_2221,
            generation: 0x3433_3231,
        };
        let b = d.encode();
        assert_eq!(b[0], DESCRIPTOR_VERSION, "version is the low byte");
        assert_eq!(&b[0..4], &[0x01, 0x44, 0x50, 0x53]);
        assert_eq!(&b[4..8], &[1, 2, 3, 4]);
        assert_eq!(&b[8..16], &[0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18]);
        assert_eq!(
            &b[16..24],
            &[0x21, 0x22, 0x23, 0x24, 0x25, 0x26, 0x27, 0x28]
        );
        assert_eq!(&b[24..28], &[0x31, 0x32, 0x33, 0x34]);
        assert_eq!(&b[28..32], &[0; 4]);
    }

    #[test]
    fn decode_errors() {
        let good = Descriptor {
            rkey: 7,
            addr: 4096,
            len: 100,
            generation: 3,
        }
        .encode();
        assert_eq!(Descriptor::decode(&good[..31]), Err(WsaError::WSAEFAULT));
        assert_eq!(Descriptor::decode(&[]), Err(WsaError::WSAEFAULT));
        let mut bad = good;
        bad[0] = 2; // version 2
        assert_eq!(Descriptor::decode(&bad), Err(WsaError::WSAEINVAL));
        let mut bad = good;
        bad[3] = 0; // magic
        assert_eq!(Descriptor::decode(&bad), Err(WsaError::WSAEINVAL));
        let mut bad = good;
        bad[31] = 1; // reserved
        assert_eq!(Descriptor::decode(&bad), Err(WsaError::WSAEINVAL));
        let mut long = good.to_vec();
        long.extend_from_slice(&[0xAA; 16]);
        assert_eq!(Descriptor::decode(&long), Descriptor::decode(&good));
    }

    #[test]
    fn target_bounds() {
        let d = Descriptor {
            rkey: 1,
            addr: 1000,
            len: 100,
            generation: 1,
        };
        assert_eq!(d.target(0, 100), Ok(1000));
        assert_eq!(d.target(100, 0), Ok(1100));
        assert_eq!(d.target(99, 1), Ok(1099));
        assert_eq!(d.target(99, 2), Err(WsaError::WSAEINVAL));
        assert_eq!(d.target(101, 0), Err(WsaError::WSAEINVAL));
        assert_eq!(d.target(u64::MAX, 2), Err(WsaError::WSAEINVAL));
        let top = Descriptor {
            addr: u64::MAX - 10,
            len: u64::MAX,
            ..d
        };
        assert_eq!(top.target(20, 0), Err(WsaError::WSAEINVAL));
    }

    fn any_descriptor() -> impl Strategy<Value = Descriptor> {
        (any::<u32>(), any::<u64>(), any::<u64>(), any::<u32>()).prop_map(
            |(rkey, addr, len, generation)| Descriptor {
                rkey,
                addr,
                len,
                generation,
            },
        )
    }

    proptest! {
        #[test]
        fn round_trip(d in any_descriptor(), tail in proptest::collection::vec(any::<u8>(), 0..8)) {
            let mut bytes = d.encode().to_vec();
            prop_assert_eq!(Descriptor::decode(&bytes), Ok(d));
            bytes.extend_from_slice(&tail);
            prop_assert_eq!(Descriptor::decode(&bytes), Ok(d));
            prop_assert_eq!(Descriptor::decode(&bytes).unwrap().encode(), d.encode());
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            match Descriptor::decode(&bytes) {
                Ok(d) => {
                    prop_assert!(bytes.len() >= DESCRIPTOR_LEN);
                    prop_assert_eq!(&d.encode()[..], &bytes[..DESCRIPTOR_LEN]);
                }
                Err(e) => prop_assert!(
                    (bytes.len() < DESCRIPTOR_LEN && e == WsaError::WSAEFAULT)
                        || (bytes.len() >= DESCRIPTOR_LEN && e == WsaError::WSAEINVAL)
                ),
            }
        }

        #[test]
        fn target_is_in_bounds_or_einval(
            d in any_descriptor(),
            offset in any::<u64>(),
            len in any::<u64>(),
        ) {
            let fits = offset.checked_add(len).is_some_and(|end| end <= d.len)
                && d.addr.checked_add(offset).is_some();
            match d.target(offset, len) {
                Ok(a) => {
                    prop_assert!(fits);
                    prop_assert_eq!(a, d.addr + offset);
                    // The whole access lies inside the exposed range.
                    prop_assert!(a - d.addr + len <= d.len);
                }
                Err(e) => {
                    prop_assert!(!fits);
                    prop_assert_eq!(e, WsaError::WSAEINVAL);
                }
            }
        }

        #[test]
        fn small_ranges_target_exactly(len in 0u64..64, offset in 0u64..80, n in 0u64..80) {
            let d = Descriptor { rkey: 9, addr: 4096, len, generation: 1 };
            prop_assert_eq!(d.target(offset, n).is_ok(), offset + n <= len);
        }
    }
}
