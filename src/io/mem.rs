//! An in-memory [`BlockIo`], for tests and fuzzing without temporary files.

use super::BlockIo;
use std::io;
use std::sync::RwLock;

/// A growable byte vector behind the [`BlockIo`] interface.
#[derive(Debug, Default)]
pub struct MemIo {
    data: RwLock<Vec<u8>>,
}

impl MemIo {
    /// Wrap `data`.
    pub fn new(data: Vec<u8>) -> Self {
        MemIo {
            data: RwLock::new(data),
        }
    }

    /// A copy of the contents.
    pub fn to_vec(&self) -> Vec<u8> {
        self.data.read().map(|d| d.clone()).unwrap_or_default()
    }
}

fn poisoned() -> io::Error {
    io::Error::other("memory image lock poisoned")
}

impl BlockIo for MemIo {
    fn size(&self) -> io::Result<u64> {
        Ok(self.data.read().map_err(|_| poisoned())?.len() as u64)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let data = self.data.read().map_err(|_| poisoned())?;
        let Ok(start) = usize::try_from(offset) else {
            return Ok(0);
        };
        if start >= data.len() {
            return Ok(0);
        }
        let n = buf.len().min(data.len() - start);
        buf[..n].copy_from_slice(&data[start..start + n]);
        Ok(n)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut data = self.data.write().map_err(|_| poisoned())?;
        let start =
            usize::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let end = start
            .checked_add(buf.len())
            .ok_or(io::ErrorKind::InvalidInput)?;
        if end > data.len() {
            data.resize(end, 0);
        }
        data[start..end].copy_from_slice(buf);
        Ok(())
    }

    fn set_size(&self, size: u64) -> io::Result<()> {
        let size =
            usize::try_from(size).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        self.data.write().map_err(|_| poisoned())?.resize(size, 0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_write_and_padding() {
        let m = MemIo::new(vec![1, 2, 3]);
        m.write_all_at(&[9, 9], 4).unwrap();
        assert_eq!(m.to_vec(), vec![1, 2, 3, 0, 9, 9]);
        let mut b = [7u8; 8];
        m.read_at_zero_padded(&mut b, 2).unwrap();
        assert_eq!(b, [3, 0, 9, 9, 0, 0, 0, 0]);
        assert!(m.read_exact_at(&mut b, 2).is_err());
        m.write_zeroes(0, 6).unwrap();
        assert_eq!(m.to_vec(), vec![0; 6]);
    }
}
