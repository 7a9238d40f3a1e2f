"""Instrument drivers: SCPI framing and IEEE 488.2 blocks (`scpi`, `blocks`), the chip-controller
command set (`command_set`), pyvisa and pyserial transports (`transports`), the chip driver
(`controller`), safety-limit checks (`limits`) and a bench source-measure unit (`smu`).
"""
