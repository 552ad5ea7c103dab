//! NTFS (placeholder while the reader is written).

use cairn_types::ReadAt;

use crate::format::NTFS_OEM_ID;
use crate::util::Sink;
use crate::{Error, Limits, Partition, Result};

/// An NTFS boot sector.
pub(crate) fn probe(b: &[u8]) -> bool {
    b.get(3..11) == Some(&NTFS_OEM_ID[..])
}

pub(crate) fn walk(_r: &dyn ReadAt, _p: &Partition, _l: &Limits, _s: &mut Sink) -> Result<()> {
    Err(Error::unsupported("NTFS"))
}
