//! The qcow2 header and L1/L2 reader of the storage agent's change tracker, over arbitrary
//! bytes as two clones of one image: never panic, hang or allocate without bound.
#![no_main]

use cairn_types::{Extent, ExtentList};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // First byte: where the two images split; the rest: previous clone, current clone.
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    let at = rest.len() * usize::from(cut) / 255;
    let (prev, cur) = (rest[..at].to_vec(), rest[at..].to_vec());
    let host = ExtentList::from_unsorted(vec![Extent::new(0, 4096), Extent::new(65536, 512)]);
    let _ = cairn_storage::qcow2::changed_guest_extents(&prev, &cur, &host);
    let _ = cairn_storage::qcow2::changed_guest_extents(&cur, &cur, &host);
    if let Ok(img) = cairn_storage::qcow2::Image::open(&cur) {
        let _ = img.mappings();
    }
});
