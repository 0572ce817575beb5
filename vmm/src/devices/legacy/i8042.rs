//! The i8042 keyboard controller at 0x60-0x64: only the CPU-reset command (0xfe to port
//! 0x64) matters, and it signals the VMM to end the VM.

use vm_superio::{I8042Device, Trigger};

use crate::devices::bus::BusDevice;

/// Offset of the command/status port (0x64) from the base (0x60).
const COMMAND_OFFSET: u64 = 4;
/// Status: output buffer empty, input buffer empty; what a guest polls for before a write.
const STATUS_IDLE: u8 = 0;

pub struct I8042<T: Trigger> {
    dev: I8042Device<T>,
}

impl<T: Trigger> I8042<T> {
    pub fn new(reset: T) -> Self {
        Self {
            dev: I8042Device::new(reset),
        }
    }
}

impl<T: Trigger + Send> BusDevice for I8042<T> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = if offset == COMMAND_OFFSET {
            STATUS_IDLE
        } else {
            self.dev.read(offset as u8)
        };
        data.fill(v);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 {
            if let Err(e) = self.dev.write(offset as u8, data[0]) {
                log::error!("i8042: failed to signal reset: {e:?}");
            }
        }
    }
}
