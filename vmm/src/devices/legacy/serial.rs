//! The 16550 UART at 0x3f8 (vm-superio), its output going to a log file or pipe.

use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use super::EventFdTrigger;
use crate::devices::bus::BusDevice;
use crate::logging::LogLimiter;
use crate::vstate::snapshot::SerialState;

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

    /// The registers, for a snapshot.
    pub fn save(&self) -> SerialState {
        let s = self.serial.state();
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// A UART in a saved state, its output going to `out`.
    pub fn restored(
        state: &SerialState,
        irq: EventFdTrigger,
        out: Box<dyn Write + Send>,
    ) -> Result<Self, String> {
        let s = vm_superio::serial::SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        Ok(Self {
            serial: Serial::from_state(&s, irq, NoEvents, out)
                .map_err(|e| format!("serial state refused: {e:?}"))?,
            log: LogLimiter::new("serial"),
        })
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
