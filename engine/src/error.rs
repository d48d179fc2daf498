//! Winsock error codes with their real numeric values (spec §0.2).
//!
//! Every SPI call of the engine returns `Result<T, WsaError>`; the C ABI stores
//! `err.code()` into `*lpErrno`. `NO_ERROR` (0) is not a variant: success is `Ok`.

use std::fmt;

macro_rules! wsa_errors {
    ($($(#[$doc:meta])* $name:ident = $value:literal,)*) => {
        /// A Winsock error as the SPI reports it.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(i32)]
        #[allow(non_camel_case_types)]
        pub enum WsaError {
            $($(#[$doc])* $name = $value,)*
        }

        impl WsaError {
            /// Every code, for tables and exhaustive tests.
            pub const ALL: &'static [WsaError] = &[$(WsaError::$name,)*];

            /// The Winsock name, e.g. `"WSAECONNRESET"`.
            pub const fn name(self) -> &'static str {
                match self {
                    $(WsaError::$name => stringify!($name),)*
                }
            }

            /// The error for a numeric code, if it is one this engine knows.
            pub const fn from_code(code: i32) -> Option<WsaError> {
                match code {
                    $($value => Some(WsaError::$name),)*
                    _ => None,
                }
            }
        }
    };
}

wsa_errors! {
    WSA_INVALID_HANDLE = 6,
    /// Completion status of every op pending when its socket was closed locally.
    WSA_OPERATION_ABORTED = 995,
    /// `WSPGetOverlappedResult(fWait = FALSE)` on an op still in progress.
    WSA_IO_INCOMPLETE = 996,
    /// Not a failure: an overlapped op was started and will complete later.
    WSA_IO_PENDING = 997,
    WSAEACCES = 10013,
    WSAEFAULT = 10014,
    WSAEINVAL = 10022,
    WSAEMFILE = 10024,
    WSAEWOULDBLOCK = 10035,
    /// Listed for completeness; a SAN provider never returns it (SOCK-6).
    WSAEINPROGRESS = 10036,
    WSAEALREADY = 10037,
    WSAENOTSOCK = 10038,
    WSAEMSGSIZE = 10040,
    WSAEPROTOTYPE = 10041,
    WSAENOPROTOOPT = 10042,
    WSAEPROTONOSUPPORT = 10043,
    WSAESOCKTNOSUPPORT = 10044,
    WSAEOPNOTSUPP = 10045,
    WSAEAFNOSUPPORT = 10047,
    WSAEADDRINUSE = 10048,
    WSAEADDRNOTAVAIL = 10049,
    WSAENETDOWN = 10050,
    WSAENETUNREACH = 10051,
    WSAENETRESET = 10052,
    WSAECONNABORTED = 10053,
    WSAECONNRESET = 10054,
    WSAENOBUFS = 10055,
    WSAEISCONN = 10056,
    WSAENOTCONN = 10057,
    WSAESHUTDOWN = 10058,
    WSAETIMEDOUT = 10060,
    WSAECONNREFUSED = 10061,
    WSAEHOSTUNREACH = 10065,
    WSAEPROCLIM = 10067,
    WSASYSNOTREADY = 10091,
    WSAVERNOTSUPPORTED = 10092,
    WSANOTINITIALISED = 10093,
    WSAEDISCON = 10101,
    WSATRY_AGAIN = 11002,
}

impl WsaError {
    /// The numeric Winsock code stored in `*lpErrno`.
    pub const fn code(self) -> i32 {
        self as i32
    }
}

impl fmt::Display for WsaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.code())
    }
}

impl std::error::Error for WsaError {}

/// Result of an SPI call.
pub type WsaResult<T> = Result<T, WsaError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_match_winsock() {
        for &e in WsaError::ALL {
            assert_eq!(WsaError::from_code(e.code()), Some(e));
        }
        assert_eq!(WsaError::WSAECONNRESET.code(), 10054);
        assert_eq!(WsaError::WSA_OPERATION_ABORTED.code(), 995);
        assert_eq!(WsaError::WSA_IO_PENDING.code(), 997);
        assert_eq!(WsaError::from_code(0), None);
        assert_eq!(
            WsaError::WSAENOTSOCK.to_string(),
            "WSAENOTSOCK (10038)".to_string()
        );
    }
}
