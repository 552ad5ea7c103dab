//! Mutated btrfs images.

use super::*;
