//! The hardware-reduced ACPI sleep registers the FADT points at
//! ([`crate::arch::acpi::SLEEP_CONTROL_PORT`] and the status byte after it). A guest
//! powering off writes `SLP_EN | SLP_TYP=5` (from `\_S5`) to the control register; that
//! ends the VM cleanly. Other sleep states are not offered, so other writes are ignored.

use crate::arch::acpi::{S5_SLEEP_TYPE, SLP_EN};
use crate::devices::bus::BusDevice;

pub struct AcpiPm<F: FnMut() + Send> {
    power_off: F,
}

impl<F: FnMut() + Send> AcpiPm<F> {
    pub fn new(power_off: F) -> Self {
        Self { power_off }
    }
}

impl<F: FnMut() + Send> BusDevice for AcpiPm<F> {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status: never woken (WAK_STS clear); control: nothing pending.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [v] = data else { return };
        let sleep_type = (v >> 2) & 0b111;
        if offset == 0 && v & SLP_EN != 0 && sleep_type == S5_SLEEP_TYPE {
            (self.power_off)();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_slp_en_with_s5_powers_off() {
        let mut count = 0;
        {
            let mut pm = AcpiPm::new(|| count += 1);
            pm.write(0, &[S5_SLEEP_TYPE << 2]); // no SLP_EN
            pm.write(0, &[SLP_EN | (3 << 2)]); // S3: not offered
            pm.write(1, &[SLP_EN | (S5_SLEEP_TYPE << 2)]); // status register
            pm.write(0, &[SLP_EN | (S5_SLEEP_TYPE << 2), 0]); // wrong width
            let mut b = [0xff];
            pm.read(1, &mut b);
            assert_eq!(b, [0]);
            pm.write(0, &[SLP_EN | (S5_SLEEP_TYPE << 2)]);
        }
        assert_eq!(count, 1);
    }
}
