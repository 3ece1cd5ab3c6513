//! Guest memory types used across the device.

use vm_memory::bitmap::BS;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap, VolatileSlice};

/// Dirty-page bitmap of guest memory regions: a no-op until the frontend sets a log base
/// (`VHOST_USER_SET_LOG_BASE`, live migration), then every write into guest memory marks its
/// pages in the frontend's log.
pub type Bitmap = vhost_user_backend::bitmap::BitmapMmapRegion;
/// Guest memory as mapped from the frontend's memory table.
pub type GuestMem = GuestMemoryMmap<Bitmap>;
/// Guest memory that the frontend can replace at run time.
pub type GuestMemAtomic = GuestMemoryAtomic<GuestMem>;
/// A slice of guest memory.
pub type Slice<'a> = VolatileSlice<'a, BS<'a, Bitmap>>;
