//! The id Zincati sends is systemd's app-specific machine id; these pin it down.

use dkron_ha::fleetlock::app_specific_machine_id;
use dkron_ha::fleetlock::machine_id::{ZINCATI_APP_ID, app_specific_id, parse_id128};
use dkron_ha::fleetlock::{ErrorKind, FleetLockError};
use proptest::prelude::*;

const LIBSYSTEMD_MACHINE: &str = "2e074e9b299c41a59923c51ae16f279b";
const LIBSYSTEMD_APP: &str = "033b1b9b264441fcaa173e9e5bf35c5a";

#[test]
fn libsystemd_test_vector_gives_its_app_specific_id() {
    let id = app_specific_id(LIBSYSTEMD_MACHINE, LIBSYSTEMD_APP).expect("valid ids");
    assert_eq!(id, "4d4a86c9c6644a479560ded5d19a30c5");
}

#[test]
fn zincati_id_uses_zincatis_app_id() {
    let zincati = app_specific_machine_id(LIBSYSTEMD_MACHINE).expect("valid id");
    let explicit = app_specific_id(LIBSYSTEMD_MACHINE, ZINCATI_APP_ID).expect("valid ids");
    assert_eq!(zincati, explicit);
    // Cross-checked with Python's hmac module.
    assert_eq!(zincati, "074c268827d74fb59ed758e8940cd667");
}

#[test]
fn machine_id_may_be_written_as_uppercase_uuid() {
    let plain = app_specific_machine_id(LIBSYSTEMD_MACHINE).expect("valid id");
    let uuid = app_specific_machine_id(" 2E074E9B-299C-41A5-9923-C51AE16F279B\n").expect("valid");
    assert_eq!(plain, uuid);
}

#[test]
fn malformed_machine_ids_are_refused_with_their_kind() {
    for bad in [
        "",
        "2e074e9b",
        "2e074e9b299c41a59923c51ae16f279bff",
        "zz074e9b299c41a59923c51ae16f279b",
    ] {
        let error = app_specific_machine_id(bad).expect_err(bad);
        assert!(
            matches!(error, FleetLockError::InvalidMachineId { .. }),
            "{bad}: {error}"
        );
        assert_eq!(error.kind(), ErrorKind::InvalidMachineId);
    }
}

proptest! {
    #[test]
    fn app_specific_id_is_a_version_4_uuid(machine in proptest::array::uniform16(any::<u8>())) {
        let hex: String = machine.iter().map(|b| format!("{b:02x}")).collect();
        let id = app_specific_machine_id(&hex).expect("32 hex digits");
        let bytes = parse_id128(&id).expect("hex out");
        prop_assert_eq!(id.len(), 32);
        prop_assert_eq!(id.clone(), id.to_lowercase());
        prop_assert_eq!(bytes[6] >> 4, 4);
        prop_assert_eq!(bytes[8] & 0xc0, 0x80);
    }
}
