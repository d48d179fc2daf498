//! `WSAEVENT` on Linux: manual-reset event objects owned by the C side.
//!
//! A Windows provider calls Win32 `SetEvent`/`ResetEvent` on the events the
//! switch passes to `WSPEventSelect`/`WSPEnumNetworkEvents`; Linux has no
//! such objects, so this library provides them: `sanpath_event_create`
//! returns a handle, and only such handles are accepted as `WSAEVENT`
//! arguments. Each handle names an `Arc<sanpath::event::Event>` kept in a
//! process-wide registry. Handle values are never reused within a process,
//! so a closed (stale) or made-up handle is always detected: the functions
//! fail instead of touching freed memory. (`hEvent` inside `WSAOVERLAPPED` is
//! unrelated: it stays an opaque value of the switch, bit 0 being the
//! notification rule.)

use crate::abi::catch;
use crate::win::*;
use sanpath::event::Event;
use sanpath::{WsaError, WsaResult};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// `sanpath_event_wait` result: the event is set.
pub const SANPATH_WAIT_SIGNALED: INT = 1;
/// `sanpath_event_wait` result: the timeout passed first.
pub const SANPATH_WAIT_TIMEOUT: INT = 0;
/// `sanpath_event_wait` result: not a live event handle.
pub const SANPATH_WAIT_FAILED: INT = -1;
/// `sanpath_event_wait` timeout meaning "no limit".
pub const SANPATH_INFINITE: DWORD = 0xFFFF_FFFF;

/// Live events by handle value.
static EVENTS: Mutex<Option<HashMap<usize, Arc<Event>>>> = Mutex::new(None);
/// Next handle number; handles are `number << 4`, never 0, never reused.
static NEXT: AtomicUsize = AtomicUsize::new(1);

fn with_events<R>(f: impl FnOnce(&mut HashMap<usize, Arc<Event>>) -> R) -> R {
    let mut g = EVENTS.lock().unwrap_or_else(PoisonError::into_inner);
    f(g.get_or_insert_with(HashMap::new))
}

/// The event a handle names: `None` for NULL, `WSAEINVAL` if the handle is
/// not a live `sanpath_event_create` handle.
pub fn lookup(h: WSAEVENT) -> WsaResult<Option<Arc<Event>>> {
    if h.is_null() {
        return Ok(None);
    }
    with_events(|m| m.get(&(h as usize)).cloned())
        .map(Some)
        .ok_or(WsaError::WSAEINVAL)
}

fn live(h: WSAEVENT) -> WsaResult<Arc<Event>> {
    lookup(h)?.ok_or(WsaError::WSAEINVAL)
}

/// Creates a manual-reset event, initially not set. Returns NULL only if
/// the process ran out of handles.
#[no_mangle]
pub extern "system" fn sanpath_event_create() -> WSAEVENT {
    catch(|| {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let key = n.checked_mul(16).ok_or(WsaError::WSAENOBUFS)?;
        with_events(|m| m.insert(key, Arc::new(Event::new())));
        // An integer used as an opaque handle (never dereferenced).
        Ok(key as WSAEVENT)
    })
    .unwrap_or(std::ptr::null_mut())
}

/// Sets the event (waking every waiter). `FALSE` if `h` is not a live handle.
#[no_mangle]
pub extern "system" fn sanpath_event_set(h: WSAEVENT) -> BOOL {
    match catch(|| live(h)) {
        Ok(e) => {
            e.set();
            TRUE
        }
        Err(_) => FALSE,
    }
}

/// Resets the event. `FALSE` if `h` is not a live handle.
#[no_mangle]
pub extern "system" fn sanpath_event_reset(h: WSAEVENT) -> BOOL {
    match catch(|| live(h)) {
        Ok(e) => {
            e.reset();
            TRUE
        }
        Err(_) => FALSE,
    }
}

/// Waits until the event is set or `timeout_ms` passed
/// (`SANPATH_INFINITE`: no limit). Returns `SANPATH_WAIT_SIGNALED`,
/// `SANPATH_WAIT_TIMEOUT`, or `SANPATH_WAIT_FAILED` for a handle that is not
/// live. Does not reset the event.
#[no_mangle]
pub extern "system" fn sanpath_event_wait(h: WSAEVENT, timeout_ms: DWORD) -> INT {
    let r = catch(|| {
        let e = live(h)?;
        let signalled = if timeout_ms == SANPATH_INFINITE {
            loop {
                if e.wait(Duration::from_secs(3600)) {
                    break true;
                }
            }
        } else {
            e.wait(Duration::from_millis(u64::from(timeout_ms)))
        };
        Ok(signalled)
    });
    match r {
        Ok(true) => SANPATH_WAIT_SIGNALED,
        Ok(false) => SANPATH_WAIT_TIMEOUT,
        Err(_) => SANPATH_WAIT_FAILED,
    }
}

/// How many times the event was set, counting sets while it already was
/// (for checks such as "signalled exactly once"); 0 for a handle that is not
/// live.
#[no_mangle]
pub extern "system" fn sanpath_event_set_count(h: WSAEVENT) -> u64 {
    catch(|| Ok(live(h)?.set_count())).unwrap_or(0)
}

/// Closes the handle; the event itself lives on while the provider still
/// refers to it (a socket's `WSPEventSelect`). `FALSE` if `h` is not live.
#[no_mangle]
pub extern "system" fn sanpath_event_close(h: WSAEVENT) -> BOOL {
    let r = catch(|| {
        if h.is_null() {
            return Err(WsaError::WSAEINVAL);
        }
        with_events(|m| m.remove(&(h as usize)))
            .map(drop)
            .ok_or(WsaError::WSAEINVAL)
    });
    if r.is_ok() {
        TRUE
    } else {
        FALSE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle_and_stale_handles() {
        let h = sanpath_event_create();
        assert!(!h.is_null());
        assert_eq!(sanpath_event_wait(h, 0), SANPATH_WAIT_TIMEOUT);
        assert_eq!(sanpath_event_set(h), TRUE);
        assert_eq!(sanpath_event_wait(h, 0), SANPATH_WAIT_SIGNALED);
        assert_eq!(
            sanpath_event_wait(h, SANPATH_INFINITE),
            SANPATH_WAIT_SIGNALED
        );
        assert_eq!(sanpath_event_set(h), TRUE);
        assert_eq!(sanpath_event_set_count(h), 2);
        assert_eq!(sanpath_event_reset(h), TRUE);
        assert_eq!(sanpath_event_wait(h, 1), SANPATH_WAIT_TIMEOUT);
        assert!(lookup(h).unwrap().is_some());
        assert_eq!(sanpath_event_close(h), TRUE);
        // Stale.
        assert_eq!(sanpath_event_close(h), FALSE);
        assert_eq!(sanpath_event_set(h), FALSE);
        assert_eq!(sanpath_event_reset(h), FALSE);
        assert_eq!(sanpath_event_wait(h, 0), SANPATH_WAIT_FAILED);
        assert_eq!(sanpath_event_set_count(h), 0);
        assert_eq!(lookup(h).unwrap_err(), WsaError::WSAEINVAL);
        // Made up and NULL.
        let junk = 0xdead_beef_usize as WSAEVENT;
        assert_eq!(sanpath_event_set(junk), FALSE);
        assert_eq!(sanpath_event_close(std::ptr::null_mut()), FALSE);
        assert!(lookup(std::ptr::null_mut()).unwrap().is_none());
        // A new handle never equals an old one.
        let h2 = sanpath_event_create();
        assert_ne!(h2, h);
        assert_eq!(sanpath_event_close(h2), TRUE);
    }
}
