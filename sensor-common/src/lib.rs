#![no_std]
//! `#[repr(C)]` types shared by the eBPF programs and the sensor (filled in by the eBPF work).
