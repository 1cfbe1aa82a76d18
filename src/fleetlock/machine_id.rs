//! The id Zincati sends: the app-specific machine id of systemd's
//! `sd_id128_get_machine_app_specific`, computed from `/etc/machine-id`.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::FleetLockError;

/// Zincati's application id; it sends `app_specific(machine-id, ZINCATI_APP_ID)`.
pub const ZINCATI_APP_ID: &str = "de35106b6ec24688b63afddaa156679b";

/// The id Zincati sends in `client_params.id` for the machine whose `/etc/machine-id` (or a
/// Node's `status.nodeInfo.machineID`) is `machine_id_hex`. Case and dashes are ignored.
pub fn app_specific_machine_id(machine_id_hex: &str) -> Result<String, FleetLockError> {
    app_specific_id(machine_id_hex, ZINCATI_APP_ID)
}

/// `sd_id128_get_machine_app_specific`: HMAC-SHA256 keyed with the 16 machine-id bytes over
/// the 16 app-id bytes, truncated to 16 bytes and stamped as a version-4 UUID.
pub fn app_specific_id(machine_id_hex: &str, app_id_hex: &str) -> Result<String, FleetLockError> {
    let machine_id = parse_id128(machine_id_hex)?;
    let app_id = parse_id128(app_id_hex)?;
    Ok(to_hex(&app_specific_bytes(&machine_id, &app_id)))
}

fn app_specific_bytes(machine_id: &[u8; 16], app_id: &[u8; 16]) -> [u8; 16] {
    // HMAC accepts keys of any length, so this constructor cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(machine_id)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(app_id);
    let digest = mac.finalize().into_bytes();
    let mut id = [0u8; 16];
    id.copy_from_slice(&digest[..16]);
    id[6] = (id[6] & 0x0f) | 0x40;
    id[8] = (id[8] & 0x3f) | 0x80;
    id
}

/// Parses a 128-bit id written as 32 hex digits, in either case, with or without UUID dashes.
pub fn parse_id128(text: &str) -> Result<[u8; 16], FleetLockError> {
    let invalid = |why: &str| FleetLockError::InvalidMachineId {
        value: text.to_owned(),
        why: why.to_owned(),
    };
    let digits: Vec<u8> = text.trim().bytes().filter(|b| *b != b'-').collect();
    if digits.len() != 32 {
        return Err(invalid("expected 32 hex digits, as in /etc/machine-id"));
    }
    let mut id = [0u8; 16];
    for (byte, pair) in id.iter_mut().zip(digits.chunks_exact(2)) {
        let high = hex_value(pair[0]).ok_or_else(|| invalid("not a hex digit"))?;
        let low = hex_value(pair[1]).ok_or_else(|| invalid("not a hex digit"))?;
        *byte = (high << 4) | low;
    }
    Ok(id)
}

fn hex_value(digit: u8) -> Option<u8> {
    char::from(digit).to_digit(16).map(|v| v as u8)
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
