"""lfm2vl/cpu.py: the CPU's name, vendor and flags, from /proc/cpuinfo or, without it, from platform."""

from lfm2vl import cpu


def test_the_vendor_without_proc_cpuinfo_comes_from_platform(monkeypatch):
    monkeypatch.setattr(cpu, "_cpuinfo", lambda: ("", "", frozenset()))
    for processor, vendor in (("Intel64 Family 6 Model 158 Stepping 10, GenuineIntel", "GenuineIntel"),
                              ("AMD64 Family 23 Model 113 Stepping 0, AuthenticAMD", "AuthenticAMD"),
                              ("i386", ""), ("arm", ""), ("", "")):
        monkeypatch.setattr(cpu.platform, "processor", lambda p=processor: p)
        assert cpu.cpu_vendor() == vendor, processor
    assert cpu.cpu_flags() == frozenset() and cpu.vector_flags() == [] and cpu.cpu_name() == ""


def test_this_machine_reads_consistently():
    if cpu.cpu_flags():  # Linux: /proc/cpuinfo
        assert set(cpu.vector_flags()) <= cpu.cpu_flags() and cpu.vector_flags() == sorted(cpu.vector_flags())
        assert cpu.cpu_name() and cpu.cpu_vendor() in ("GenuineIntel", "AuthenticAMD") or "avx" not in cpu.cpu_flags()
