//! The 16550 UART at 0x3f8 (vm-superio), its output going to a log file or pipe.

use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use super::EventFdTrigger;
use crate::devices::bus::BusDevice;
use crate::logging::LogLimiter;

pub struct SerialDevice {
    serial: Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>,
    log: LogLimiter,
}

impl SerialDevice {
    pub fn new(irq: EventFdTrigger, out: Box<dyn Write + Send>) -> Self {
        Self {
            serial: Serial::new(irq, out),
            log: LogLimiter::new("serial"),
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < 8 {
            data[0] = self.serial.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 || offset >= 8 {
            return;
        }
        if let Err(e) = self.serial.write(offset as u8, data[0]) {
            if self.log.allow() {
                log::warn!("serial: write failed: {e:?}");
            }
        }
        // Flush per byte: the log must be complete even if the VMM is killed.
        if offset == 0 {
            let _ = self.serial.writer_mut().flush();
        }
    }
}
