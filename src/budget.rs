//! Memory budgets in bytes. A reader of untrusted input charges every buffer, table and map it
//! holds against one [`Budget`] before allocating it, so its memory stays bounded whatever the
//! shape of the input, and running out is a clear [`ErrorKind::TooLarge`] error instead of an
//! out-of-memory kill. Budgets are shared between threads (decoder workers charge their
//! buffers too).

use crate::error::{Error, ErrorKind, Result};
use std::sync::atomic::{AtomicU64, Ordering};

/// A limit on the bytes held, and what is held now.
#[derive(Debug)]
pub struct Budget {
    limit: u64,
    used: AtomicU64,
    peak: AtomicU64,
}

impl Budget {
    /// A budget of `limit` bytes, none used.
    pub fn new(limit: u64) -> Budget {
        Budget {
            limit,
            used: AtomicU64::new(0),
            peak: AtomicU64::new(0),
        }
    }

    /// The limit in bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes charged now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// The most bytes charged at once so far.
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }

    /// Charge `n` bytes if they fit; false (and nothing charged) if not.
    pub fn try_charge(&self, n: u64) -> bool {
        let mut cur = self.used.load(Ordering::Relaxed);
        loop {
            let Some(next) = cur.checked_add(n).filter(|&v| v <= self.limit) else {
                return false;
            };
            match self
                .used
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => {
                    self.peak.fetch_max(next, Ordering::Relaxed);
                    return true;
                }
                Err(v) => cur = v,
            }
        }
    }

    /// Charge `n` bytes for `what`, or fail with a [`ErrorKind::TooLarge`] error naming it.
    pub fn charge(&self, n: u64, what: &str) -> Result<()> {
        if self.try_charge(n) {
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::TooLarge,
            format!(
                "memory budget of {} exhausted by {what} ({} bytes held, {n} more needed)",
                human(self.limit),
                self.used()
            ),
        ))
    }

    /// Give back `n` charged bytes.
    pub fn release(&self, n: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(n))
            });
    }
}

fn human(n: u64) -> String {
    if n >= 1 << 20 && n % (1 << 20) == 0 {
        format!("{} MiB", n >> 20)
    } else {
        format!("{n} bytes")
    }
}

/// The share of a budget one holder has charged: resized as the holder grows and shrinks,
/// released when dropped.
#[derive(Debug)]
pub struct Account<'b> {
    budget: &'b Budget,
    bytes: u64,
}

impl<'b> Account<'b> {
    /// An empty account on `budget`.
    pub fn new(budget: &'b Budget) -> Account<'b> {
        Account { budget, bytes: 0 }
    }

    /// Bytes charged to this account.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Make the account hold exactly `n` bytes, charging (for `what`) or releasing the
    /// difference.
    pub fn set(&mut self, n: u64, what: &str) -> Result<()> {
        if n > self.bytes {
            self.budget.charge(n - self.bytes, what)?;
        } else {
            self.budget.release(self.bytes - n);
        }
        self.bytes = n;
        Ok(())
    }

    /// Add `n` bytes (for `what`).
    pub fn add(&mut self, n: u64, what: &str) -> Result<()> {
        self.budget.charge(n, what)?;
        self.bytes += n;
        Ok(())
    }

    /// Add `n` bytes if they fit.
    pub fn try_add(&mut self, n: u64) -> bool {
        let ok = self.budget.try_charge(n);
        if ok {
            self.bytes += n;
        }
        ok
    }

    /// Give back `n` bytes (at most what the account holds).
    pub fn sub(&mut self, n: u64) {
        let n = n.min(self.bytes);
        self.budget.release(n);
        self.bytes -= n;
    }
}

impl Drop for Account<'_> {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_are_bounded_and_released() {
        let b = Budget::new(100);
        assert!(b.try_charge(60));
        assert!(!b.try_charge(41));
        let e = b.charge(41, "a test").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::TooLarge);
        assert!(e.to_string().contains("a test"), "{e}");
        {
            let mut a = Account::new(&b);
            a.set(40, "x").unwrap();
            assert_eq!(b.used(), 100);
            assert!(a.set(41, "x").is_err());
            a.set(10, "x").unwrap();
            assert_eq!(b.used(), 70);
        }
        assert_eq!(b.used(), 60);
        assert_eq!(b.peak(), 100);
        b.release(1000);
        assert_eq!(b.used(), 0);
    }
}
