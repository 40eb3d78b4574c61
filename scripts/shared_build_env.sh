# Sourced (not run) by .ci/run and scripts/run_notebooks.sh. Build settings under which
# `cargo test` leaves in the target dir exactly the dependency artifacts (candle & co.) that the
# evcxr kernel's own `cargo build` for the notebooks asks for, so that build compiles only
# matvlm and the cells instead of every dependency a second time.
#
# evcxr builds its generated crate with `--target <host>`, RUSTFLAGS=-Cprefer-dynamic and a
# [profile.dev] of its own (rpath = true, strip = "debuginfo", codegen-units = 16, opt-level = 2,
# no debug info). Cargo keys each artifact on the target kind, the rustflags and every profile
# field, so the test build takes evcxr's target kind, rustflags and rpath, and both builds pin
# strip and codegen-units (a value set explicitly hashes differently from the same default).
# The kernel side's remaining fields are set in scripts/run_notebooks.sh, mirroring Cargo.toml.
export CARGO_BUILD_TARGET="$(rustc -vV | sed -n 's/^host: //p')"
export RUSTFLAGS=-Cprefer-dynamic
export CARGO_PROFILE_DEV_RPATH=true
export CARGO_PROFILE_DEV_STRIP=none
export CARGO_PROFILE_DEV_CODEGEN_UNITS=256
