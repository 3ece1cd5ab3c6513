//! Guest memory types used across the device.

use vm_memory::bitmap::BS;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap, VolatileSlice};

/// Dirty-page bitmap type of guest memory regions.
pub type Bitmap = ();
/// Guest memory as mapped from the frontend's memory table.
pub type GuestMem = GuestMemoryMmap<Bitmap>;
/// Guest memory that the frontend can replace at run time.
pub type GuestMemAtomic = GuestMemoryAtomic<GuestMem>;
/// A slice of guest memory.
pub type Slice<'a> = VolatileSlice<'a, BS<'a, Bitmap>>;
