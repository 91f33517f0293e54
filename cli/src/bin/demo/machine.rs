//! What the figures were measured on: the processor and its matrix units, which decide
//! whether a 16-bit precision can be faster than float32 there.
use tch::Device;

/// The machine a comparison ran on.
#[derive(Debug, Clone)]
pub struct Machine {
    /// The CPU's model name (`/proc/cpuinfo`), or the CUDA device.
    pub name: String,
    /// The CPU's matrix and vector units for 16-bit floats, as `/proc/cpuinfo` names them.
    pub units: Vec<String>,
    /// Whether bfloat16 matrix products run natively (AMX-BF16 or AVX512-BF16; tensor cores).
    pub bf16: bool,
    /// Whether float16 matrix products run natively (AMX-FP16 or AVX512-FP16; tensor cores).
    pub fp16: bool,
}

/// The flags that speed 16-bit matrix products up, and which dtype each serves.
const UNITS: [(&str, &str); 4] = [
    ("amx_bf16", "bf16"),
    ("avx512_bf16", "bf16"),
    ("amx_fp16", "fp16"),
    ("avx512_fp16", "fp16"),
];

impl Machine {
    /// The machine `device` belongs to.
    pub fn detect(device: Device) -> Machine {
        if let Device::Cuda(i) = device {
            return Machine {
                name: format!("CUDA device {i}"),
                units: vec!["tensor cores".into()],
                bf16: true,
                fp16: true,
            };
        }
        let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Machine::from_cpuinfo(&info)
    }

    fn from_cpuinfo(info: &str) -> Machine {
        let field = |key: &str| {
            info.lines()
                .find(|l| l.split(':').next().is_some_and(|k| k.trim() == key))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        };
        let flags = field("flags").unwrap_or_default();
        let flags: Vec<&str> = flags.split_whitespace().collect();
        let has = |dtype: &str| {
            UNITS
                .iter()
                .any(|(flag, d)| *d == dtype && flags.contains(flag))
        };
        Machine {
            name: field("model name").unwrap_or_else(|| "unknown CPU".into()),
            units: UNITS
                .iter()
                .filter(|(flag, _)| flags.contains(flag))
                .map(|(flag, _)| flag.to_string())
                .collect(),
            bf16: has("bf16"),
            fp16: has("fp16"),
        }
    }

    /// One line: the device, its cores, and its 16-bit matrix units.
    pub fn describe(&self) -> String {
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        let units = if self.units.is_empty() {
            "no 16-bit matrix units (no AMX-BF16, AVX512-BF16, AMX-FP16 or AVX512-FP16)".into()
        } else {
            self.units.join(", ")
        };
        format!("{}, {cores} cores: {units}", self.name)
    }

    /// What not to expect on this machine, if anything.
    pub fn caveat(&self) -> Option<String> {
        let missing: Vec<&str> = [("bfloat16", self.bf16), ("float16", self.fp16)]
            .iter()
            .filter(|(_, native)| !native)
            .map(|(name, _)| *name)
            .collect();
        if missing.is_empty() {
            return None;
        }
        Some(format!(
            "This CPU has no {} matrix units: libtorch multiplies such matrices by converting \
             them to float32 on the fly, so no speed-up over 32-true is to be expected here \
             from the precisions that compute in {} (they can be slower). What they save here \
             is memory: see the tensor-memory columns.",
            missing.join(" or "),
            missing.join(" or ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_model_and_its_units() {
        let amd = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 fma\n";
        let m = Machine::from_cpuinfo(amd);
        assert_eq!(m.name, "AMD EPYC");
        assert!(!m.bf16 && !m.fp16 && m.units.is_empty());
        assert!(m.caveat().unwrap().contains("bfloat16 or float16"));

        let xeon = "model name\t: Intel(R) Xeon(R) Platinum 8480+\n\
                    flags\t\t: avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile\n";
        let m = Machine::from_cpuinfo(xeon);
        assert_eq!(m.units, ["amx_bf16", "avx512_bf16", "avx512_fp16"]);
        assert!(m.bf16 && m.fp16 && m.caveat().is_none());
    }
}
