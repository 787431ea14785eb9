//! Money in integer minor units with an ISO 4217 currency; checked arithmetic only.
//!
//! Amounts are `i64` counts of the currency's minor unit (cents for EUR, yen for JPY). Floats
//! never appear. Every sum is checked, so an overflow is an error instead of a wrap.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::ModelError;

/// Currencies with a minor-unit exponent other than 2 (ISO 4217, active codes).
const NON_TWO_DECIMAL: &[(&str, u8)] = &[
    ("BIF", 0),
    ("CLP", 0),
    ("DJF", 0),
    ("GNF", 0),
    ("ISK", 0),
    ("JPY", 0),
    ("KMF", 0),
    ("KRW", 0),
    ("PYG", 0),
    ("RWF", 0),
    ("UGX", 0),
    ("UYI", 0),
    ("VND", 0),
    ("VUV", 0),
    ("XAF", 0),
    ("XOF", 0),
    ("XPF", 0),
    ("BHD", 3),
    ("IQD", 3),
    ("JOD", 3),
    ("KWD", 3),
    ("LYD", 3),
    ("OMR", 3),
    ("TND", 3),
    ("CLF", 4),
    ("UYW", 4),
];

/// Active ISO 4217 currencies whose minor unit is a hundredth.
const TWO_DECIMAL: &[&str] = &[
    "AED", "AFN", "ALL", "AMD", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD", "BDT", "BGN",
    "BMD", "BND", "BOB", "BRL", "BSD", "BTN", "BWP", "BYN", "BZD", "CAD", "CDF", "CHF", "CNY",
    "COP", "CRC", "CUP", "CVE", "CZK", "DKK", "DOP", "DZD", "EGP", "ERN", "ETB", "EUR", "FJD",
    "FKP", "GBP", "GEL", "GHS", "GIP", "GMD", "GTQ", "GYD", "HKD", "HNL", "HTG", "HUF", "IDR",
    "ILS", "INR", "IRR", "JMD", "KES", "KGS", "KHR", "KPW", "KYD", "KZT", "LAK", "LBP", "LKR",
    "LRD", "LSL", "MAD", "MDL", "MGA", "MKD", "MMK", "MNT", "MOP", "MRU", "MUR", "MVR", "MWK",
    "MXN", "MYR", "MZN", "NAD", "NGN", "NIO", "NOK", "NPR", "NZD", "PAB", "PEN", "PGK", "PHP",
    "PKR", "PLN", "QAR", "RON", "RSD", "RUB", "SAR", "SBD", "SCR", "SDG", "SEK", "SGD", "SHP",
    "SLE", "SOS", "SRD", "SSP", "STN", "SVC", "SYP", "SZL", "THB", "TJS", "TMT", "TOP", "TRY",
    "TTD", "TWD", "TZS", "UAH", "USD", "UZS", "VES", "WST", "XCD", "XCG", "YER", "ZAR", "ZMW",
    "ZWG",
];

/// An ISO 4217 alphabetic currency code known to this build.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Currency([u8; 3]);

impl Currency {
    /// Parses a three-letter upper-case ISO 4217 code; unknown codes are refused.
    pub fn new(code: &str) -> Result<Self, ModelError> {
        let known = TWO_DECIMAL.contains(&code) || NON_TWO_DECIMAL.iter().any(|(c, _)| *c == code);
        match <[u8; 3]>::try_from(code.as_bytes()) {
            Ok(bytes) if known => Ok(Self(bytes)),
            _ => Err(ModelError::UnknownCurrency(code.to_owned())),
        }
    }

    /// The code as text, for example `"EUR"`.
    pub fn code(&self) -> &str {
        // Only ASCII codes from the tables above are ever stored.
        std::str::from_utf8(&self.0).unwrap_or("???")
    }

    /// Digits after the decimal point of this currency's major unit (2 for EUR, 0 for JPY).
    pub fn minor_unit_exponent(&self) -> u8 {
        NON_TWO_DECIMAL
            .iter()
            .find(|(c, _)| *c == self.code())
            .map_or(2, |(_, e)| *e)
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Currency({})", self.code())
    }
}

impl Serialize for Currency {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.code())
    }
}

impl<'de> Deserialize<'de> for Currency {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(&s).map_err(serde::de::Error::custom)
    }
}

/// An amount of money: integer minor units of one currency.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Money {
    /// The amount in minor units (cents, pence, yen); may be negative only for derived values.
    pub minor: i64,
    /// The currency of the amount.
    pub currency: Currency,
}

impl Money {
    /// An amount of `minor` units of `currency`.
    pub fn new(minor: i64, currency: Currency) -> Self {
        Self { minor, currency }
    }

    /// Zero in `currency`.
    pub fn zero(currency: Currency) -> Self {
        Self { minor: 0, currency }
    }

    /// `self + other`, refusing mixed currencies and overflow.
    pub fn checked_add(self, other: Self) -> Result<Self, ModelError> {
        self.same_currency(other)?;
        let minor = self
            .minor
            .checked_add(other.minor)
            .ok_or(ModelError::AmountOverflow)?;
        Ok(Self {
            minor,
            currency: self.currency,
        })
    }

    /// `self - other`, refusing mixed currencies and overflow.
    pub fn checked_sub(self, other: Self) -> Result<Self, ModelError> {
        self.same_currency(other)?;
        let minor = self
            .minor
            .checked_sub(other.minor)
            .ok_or(ModelError::AmountOverflow)?;
        Ok(Self {
            minor,
            currency: self.currency,
        })
    }

    fn same_currency(self, other: Self) -> Result<(), ModelError> {
        if self.currency == other.currency {
            Ok(())
        } else {
            Err(ModelError::CurrencyMismatch {
                expected: self.currency.code().to_owned(),
                found: other.currency.code().to_owned(),
            })
        }
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let exp = u32::from(self.currency.minor_unit_exponent());
        let sign = if self.minor < 0 { "-" } else { "" };
        let abs = self.minor.unsigned_abs();
        if exp == 0 {
            return write!(f, "{sign}{abs} {}", self.currency);
        }
        let scale = 10u64.pow(exp);
        write!(
            f,
            "{sign}{}.{:0width$} {}",
            abs / scale,
            abs % scale,
            self.currency,
            width = exp as usize
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn currencies_are_checked() {
        assert_eq!(Currency::new("EUR").unwrap().minor_unit_exponent(), 2);
        assert_eq!(Currency::new("JPY").unwrap().minor_unit_exponent(), 0);
        assert_eq!(Currency::new("KWD").unwrap().minor_unit_exponent(), 3);
        assert!(Currency::new("eur").is_err());
        assert!(Currency::new("XXX").is_err());
        assert!(Currency::new("EURO").is_err());
    }

    #[test]
    fn arithmetic_is_checked() {
        let eur = Currency::new("EUR").unwrap();
        let usd = Currency::new("USD").unwrap();
        let a = Money::new(150, eur);
        assert_eq!(a.checked_add(Money::new(50, eur)).unwrap().minor, 200);
        assert!(a.checked_add(Money::new(1, usd)).is_err());
        assert!(
            Money::new(i64::MAX, eur)
                .checked_add(Money::new(1, eur))
                .is_err()
        );
        assert!(
            Money::new(i64::MIN, eur)
                .checked_sub(Money::new(1, eur))
                .is_err()
        );
    }

    #[test]
    fn money_displays_in_major_units() {
        let eur = Currency::new("EUR").unwrap();
        assert_eq!(Money::new(1205, eur).to_string(), "12.05 EUR");
        assert_eq!(Money::new(-5, eur).to_string(), "-0.05 EUR");
        assert_eq!(
            Money::new(500, Currency::new("JPY").unwrap()).to_string(),
            "500 JPY"
        );
    }
}
