"""The original faafo worker's pixel loop, as a reference for the Rust renderer.

Reads `width height iterations xa xb ya yb cx cy` from argv and writes raw RGB bytes
to stdout. Written in the original's arithmetic: Python floats and complex numbers,
`abs(z)` (libm hypot) for the escape test.
"""
import sys

width, height, iterations = (int(v) for v in sys.argv[1:4])
xa, xb, ya, yb, cx, cy = (float(v) for v in sys.argv[4:10])
c = cx + cy * 1j
out = bytearray()
for y in range(height):
    zy = y * (yb - ya) / (height - 1) + ya if height > 1 else ya
    for x in range(width):
        zx = x * (xb - xa) / (width - 1) + xa if width > 1 else xa
        z = zx + zy * 1j
        for i in range(iterations):
            if abs(z) > 2.0:
                break
            z = z * z + c
        out += bytes((i % 8 * 32, i % 16 * 16, i % 32 * 8))
sys.stdout.buffer.write(out)
