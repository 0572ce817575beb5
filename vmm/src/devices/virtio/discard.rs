//! Giving guest memory back to the host, behind a trait so that devices which do it
//! (the balloon's free page reporting, virtio-mem's unplug) are tested with a fake.

/// Gives guest memory back to the host.
pub trait Discard: Send {
    /// Drops the pages behind `len` bytes of guest RAM at host address `host`; the guest
    /// reads zeros there afterwards.
    fn discard(&mut self, host: *mut u8, len: usize) -> Result<(), String>;
}

/// `MADV_REMOVE` on the shared mapping: frees the pages (and the file's blocks) of a
/// memfd or tmpfs file, a whole huge page at a time where the range covers one.
pub struct RemovePages;

impl Discard for RemovePages {
    fn discard(&mut self, host: *mut u8, len: usize) -> Result<(), String> {
        // SAFETY: `host..host+len` lies inside the guest RAM mapping (checked by the
        // caller through `GuestMemory::get_slice`); MADV_REMOVE only drops its contents.
        let r = unsafe { libc::madvise(host.cast(), len, libc::MADV_REMOVE) };
        if r != 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        Ok(())
    }
}
