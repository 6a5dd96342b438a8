//! Kubernetes resource quantities (`500m`, `8Gi`, `1e3`, `110`) as whole
//! thousandths of their unit, so CPU, memory and pod counts add, subtract
//! and compare exactly. Hand-written: the quantity crates pin their own
//! k8s-openapi, and the forms below are all the API server emits.

/// A quantity in thousandths of its unit (`1` CPU = 1000, `1Ki` = 1,024,000).
pub type Millis = i128;

/// Parses a quantity, or says why not (naming the text).
pub fn parse(text: &str) -> Result<Millis, String> {
    let bad = || format!("{text:?} is not a quantity (like 500m, 2, 8Gi or 1e3)");
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(t.len());
    let (number, suffix) = t.split_at(split);
    if number.is_empty() {
        return Err(bad());
    }
    // Value = number × 10^exp10 × 2^exp2, computed in thousandths.
    let (exp10, exp2): (i32, u32) = match suffix {
        "" => (0, 0),
        "n" => (-9, 0),
        "u" => (-6, 0),
        "m" => (-3, 0),
        "k" => (3, 0),
        "M" => (6, 0),
        "G" => (9, 0),
        "T" => (12, 0),
        "P" => (15, 0),
        "E" => (18, 0),
        "Ki" => (0, 10),
        "Mi" => (0, 20),
        "Gi" => (0, 30),
        "Ti" => (0, 40),
        "Pi" => (0, 50),
        "Ei" => (0, 60),
        s if s.starts_with(['e', 'E']) => (s[1..].parse().map_err(|_| bad())?, 0),
        _ => return Err(bad()),
    };
    let negative = number.starts_with('-');
    let digits = number.trim_start_matches(['+', '-']);
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    if whole.is_empty() && fraction.is_empty() {
        return Err(bad());
    }
    let all_digits = format!("{whole}{fraction}");
    let mantissa: i128 = all_digits.parse().map_err(|_| bad())?;
    // number = mantissa × 10^-len(fraction); in thousandths: × 10^3.
    let scale = exp10 + 3 - fraction.len() as i32;
    let scaled = if scale >= 0 {
        mantissa
            .checked_mul(10i128.checked_pow(scale as u32).ok_or_else(bad)?)
            .ok_or_else(bad)?
    } else {
        // Below a thousandth: round up, as the API server does.
        let div = 10i128.checked_pow((-scale) as u32).ok_or_else(bad)?;
        (mantissa + div - 1) / div
    };
    let value = scaled.checked_mul(1i128 << exp2).ok_or_else(bad)?;
    Ok(if negative { -value } else { value })
}

/// The canonical text of `millis`: whole units when exact, else `…m`.
pub fn format(millis: Millis) -> String {
    if millis % 1000 == 0 {
        (millis / 1000).to_string()
    } else {
        format!("{millis}m")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_forms_the_api_server_writes_parse_exactly() {
        assert_eq!(parse("500m"), Ok(500));
        assert_eq!(parse("2"), Ok(2000));
        assert_eq!(parse("1.5"), Ok(1500));
        assert_eq!(parse("8Gi"), Ok(8 * 1024 * 1024 * 1024 * 1000));
        assert_eq!(parse("128974848"), Ok(128_974_848_000));
        assert_eq!(parse("129M"), Ok(129_000_000_000));
        assert_eq!(parse("1e3"), Ok(1_000_000));
        assert_eq!(parse("110"), Ok(110_000));
        assert_eq!(parse("100n"), Ok(1), "below a thousandth rounds up");
        assert!(parse("").is_err());
        assert!(parse("Gi").is_err());
        assert!(parse("3 cats").is_err());
        assert!(parse("1Xi").is_err());
    }

    #[test]
    fn formatting_keeps_the_value() {
        for text in ["500m", "2", "8589934592", "110", "1500m"] {
            let millis = parse(text).expect("parses");
            assert_eq!(parse(&format(millis)), Ok(millis), "{text}");
        }
        assert_eq!(format(1500), "1500m");
        assert_eq!(format(4000), "4");
    }
}
