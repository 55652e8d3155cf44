"""TLS scan: sslyze against the running gateway, checked against Mozilla's "intermediate" profile.

The same check as ``sslyze --mozilla_config=intermediate 127.0.0.1:PORT``
(sslyze's Python API): protocol versions (TLS 1.2 and 1.3 only), cipher
suites, key-exchange groups (P-256 only), certificate type,
curve, signature and lifespan, and the vulnerability checks (compression,
Heartbleed, CCS injection, ROBOT, fallback SCSV, secure renegotiation,
extended master secret). Certificate path validation uses the household CA
(``certs export-ca``) as the trust store: it is what clients are told to trust.
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path

import pytest

from tests.harness import start_gateway, start_simulator

sslyze = pytest.importorskip("sslyze")


# sslyze's bundled trust stores hold old roots that cryptography warns about.
@pytest.mark.filterwarnings("ignore:Parsed a serial number")
def test_gateway_tls_is_compliant_with_mozilla_intermediate(tmp_path: Path) -> None:
    from sslyze import (
        CertificateInfoExtraArgument,
        ScanCommandsExtraArguments,
        Scanner,
        ServerNetworkLocation,
        ServerScanRequest,
        ServerScanStatusEnum,
    )
    from sslyze.mozilla_tls_profile.tls_config_checker import (
        SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER,
        MozillaTlsConfiguration,
        ServerNotCompliantWithTlsConfiguration,
        TlsConfigurationEnum,
        check_server_against_tls_configuration,
    )

    sim = start_simulator(tmp_path / "sim", "--latency-scale", "0.05")
    gw = start_gateway(tmp_path / "gw", sim.url, {"server": {"tls": "self-signed"}})
    try:
        assert gw.ca is not None and gw.ca.exists()
        port = int(urllib.parse.urlsplit(gw.url).port or 0)
        request = ServerScanRequest(
            server_location=ServerNetworkLocation(hostname="localhost", port=port, ip_address="127.0.0.1"),
            scan_commands=SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER,
            scan_commands_extra_arguments=ScanCommandsExtraArguments(
                certificate_info=CertificateInfoExtraArgument(custom_ca_file=gw.ca)
            ),
        )
        scanner = Scanner()
        scanner.queue_scans([request])
        results = list(scanner.get_results())
        assert len(results) == 1 and results[0].scan_status == ServerScanStatusEnum.COMPLETED, results
        result = results[0]
        profile = MozillaTlsConfiguration.get(TlsConfigurationEnum.MOZILLA_INTERMEDIATE)
        try:
            check_server_against_tls_configuration(result, profile)
        except ServerNotCompliantWithTlsConfiguration as exc:
            pytest.fail(f"not compliant with Mozilla intermediate: {exc.issues}")
        # The figures behind the verdict, for the record.
        scan = result.scan_result
        assert scan is not None
        accepted = {
            version: [c.cipher_suite.name for c in getattr(scan, attr).result.accepted_cipher_suites]
            for version, attr in (
                ("SSLv2", "ssl_2_0_cipher_suites"), ("SSLv3", "ssl_3_0_cipher_suites"), ("TLSv1.0", "tls_1_0_cipher_suites"),
                ("TLSv1.1", "tls_1_1_cipher_suites"), ("TLSv1.2", "tls_1_2_cipher_suites"), ("TLSv1.3", "tls_1_3_cipher_suites"),
            )
        }
        assert not any(accepted[v] for v in ("SSLv2", "SSLv3", "TLSv1.0", "TLSv1.1")), accepted
        assert accepted["TLSv1.2"] and accepted["TLSv1.3"], accepted
        curves = {c.name for c in scan.elliptic_curves.result.supported_curves or []}
        assert curves == {"secp256r1"}, curves  # OpenSSL's default list adds X448 and P-521
        print(f"\ntls scan: compliant with Mozilla intermediate; {accepted['TLSv1.2'] + accepted['TLSv1.3']}; groups {sorted(curves)}")
    finally:
        gw.stop()
        sim.stop()
