//! Stopping a run from Ctrl-C without losing work.
//!
//! The training loop only reads a flag (checked between steps); it never installs a signal
//! handler itself, so a REPL or notebook keeps control of its own signals. Binaries call
//! [`ctrlc_flag`] once to have Ctrl-C set that flag.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::{Error, Result};

static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
static INSTALL: Mutex<()> = Mutex::new(());

/// A cancellation flag set by Ctrl-C (SIGINT, and SIGTERM or SIGHUP on Unix). The handler is
/// installed on the first call; later calls return the same flag. A first Ctrl-C asks the loop to
/// checkpoint and stop at the next step boundary; a second one, while the flag is still set,
/// exits the process at once (status 130) for when a step hangs.
///
/// Whoever consumes a cancellation should store `false` back into the flag before the next run.
pub fn ctrlc_flag() -> Result<Arc<AtomicBool>> {
    let _guard = INSTALL
        .lock()
        .map_err(|_| Error::Other("the Ctrl-C install lock is poisoned".into()))?;
    if let Some(flag) = FLAG.get() {
        return Ok(flag.clone());
    }
    let flag = Arc::new(AtomicBool::new(false));
    let handler_flag = flag.clone();
    ctrlc::set_handler(move || {
        if handler_flag.swap(true, Ordering::SeqCst) {
            eprintln!("\ninterrupted twice: exiting without a checkpoint");
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: stopping after this step and saving a checkpoint (Ctrl-C again to quit now)");
    })
    .map_err(|e| Error::Other(format!("installing the Ctrl-C handler: {e}")))?;
    // Cannot fail: we hold the install lock and checked FLAG is empty.
    let _ = FLAG.set(flag.clone());
    Ok(flag)
}
