;; phone-context 1.0.0: a Shoal feature module ("shoal-features" ABI 1, see
;; docs/portable-features.md), hand-written in the WebAssembly text format.
;;
;; A record is four f64 inputs, in this order:
;;   timestamp_ms   milliseconds since 1970-01-01T00:00:00Z (may be negative)
;;   latitude       degrees, -90..90
;;   longitude      degrees, -180..180
;;   battery_level  0..1
;; and it gets six f64 features, in this order:
;;   hour_sin, hour_cos  the UTC time of day h in [0, 24) hours as a point on
;;                       the circle: sin and cos of 2*pi*h/24 (23:59 sits next
;;                       to 00:00, as it does on a clock)
;;   is_weekend          1 on Saturday and Sunday (UTC), else 0
;;   battery_bucket      floor(battery_level * 10) clamped to 0..9
;;   geocell_lat         the row of the record's geohash-5 cell / 4095
;;   geocell_lon         the column of the record's geohash-5 cell / 8191
;;
;; A record is refused (shoal_extract returns k, the host names record k - 1)
;; when its timestamp is NaN, infinite or beyond +-8.64e15 ms (the range of a
;; JavaScript Date, +-100,000,000 days), its latitude is NaN or outside
;; [-90, 90], its longitude NaN or outside [-180, 180], or its battery level
;; NaN. An infinite battery level is clamped like any other (to 0 or 9).
;;
;; Everything a feature depends on is f64 arithmetic whose every step
;; IEEE 754 rounds one way only (add, sub, mul, div, floor, nearest,
;; comparisons), so every host computes the same bits. The module imports
;; nothing and keeps no state between batches.
(module
  ;; The manifest the host reads before running anything (ABI 1).
  (@custom "shoal.features"
    "{\"abi\": 1, \"name\": \"phone-context\", \"version\": \"1.0.0\", "
    "\"inputs\": [\"timestamp_ms\", \"latitude\", \"longitude\", \"battery_level\"], "
    "\"outputs\": [\"hour_sin\", \"hour_cos\", \"is_weekend\", \"battery_bucket\", "
    "\"geocell_lat\", \"geocell_lon\"]}")

  ;; One 64 KiB page to start with; shoal_alloc grows it (the host caps it).
  (memory (export "memory") 1)

  ;; ---------------------------------------------------------------------------
  ;; Memory: a bump allocator. Each batch runs in a fresh instance, so nothing
  ;; is ever freed. The first 1 KiB stays unused, so no region starts at 0.
  (global $heap (mut i64) (i64.const 1024))

  (func (export "shoal_alloc") (param $bytes i32) (result i32)
    (local $ptr i64)
    (local $end i64)
    (local $pages i64)
    ;; round the heap pointer up to a multiple of 8
    (local.set $ptr
      (i64.and (i64.add (global.get $heap) (i64.const 7)) (i64.const -8)))
    ;; the region's end, in i64 so nothing wraps (bytes counts as unsigned)
    (local.set $end
      (i64.add (local.get $ptr) (i64.extend_i32_u (local.get $bytes))))
    ;; a 32-bit memory holds at most 4 GiB: a larger request traps
    (if (i64.ge_u (local.get $end) (i64.const 0x1_0000_0000))
      (then (unreachable)))
    ;; 64 KiB pages needed to hold [0, end), rounded up
    (local.set $pages
      (i64.shr_u (i64.add (local.get $end) (i64.const 0xffff)) (i64.const 16)))
    (if (i64.gt_u (local.get $pages) (i64.extend_i32_u (memory.size)))
      (then
        ;; memory.grow returns -1 when it cannot (the host's cap): trap
        (if (i32.eq
              (memory.grow
                (i32.wrap_i64
                  (i64.sub (local.get $pages) (i64.extend_i32_u (memory.size)))))
              (i32.const -1))
          (then (unreachable)))))
    (global.set $heap (local.get $end))
    (i32.wrap_i64 (local.get $ptr)))

  ;; ---------------------------------------------------------------------------
  ;; sin and cos without a sin instruction (WebAssembly has none).
  ;;
  ;; The angle comes in *turns* (x = 0.25 is 90 degrees), which makes the
  ;; argument reduction exact: q = nearest(4x) is the nearest multiple of 90
  ;; degrees and 4x - q in [-1/2, 1/2] is computed without rounding (4x is
  ;; exact, and so is the difference of two close numbers). The remainder
  ;; becomes radians theta = (4x - q) * pi/2 in [-pi/4, pi/4], one rounding.
  ;;
  ;; On [-pi/4, pi/4] the Taylor series converge fast: sin to theta^15 leaves
  ;; at most (pi/4)^17/17! < 5e-17 out, cos to theta^16 at most
  ;; (pi/4)^18/18! < 3e-18. Evaluated by Horner's rule in f64, the result is
  ;; within a few units in the last place of the true sin and cos of 2*pi*x
  ;; (measured over 2.5 million times of day against 64-bit-mantissa sin and
  ;; cos: at most 4.1e-16 off; float64 numpy, from a rounded angle, 1.4e-15).
  ;;
  ;; Then sin(q*90deg + theta) and cos(q*90deg + theta) are sin(theta) and
  ;; cos(theta) swapped and negated by quadrant. Whole quarter turns (00:00,
  ;; 06:00, 12:00, 18:00) come out exact: 0 and +-1.

  ;; sin(theta) for |theta| <= pi/4, the Taylor polynomial of degree 15:
  ;; theta + theta^3 (-1/3! + theta^2 (1/5! + theta^2 (-1/7! + ...)))
  (func $sin_poly (param $t f64) (result f64)
    (local $z f64)
    (local.set $z (f64.mul (local.get $t) (local.get $t)))
    (f64.add
      (local.get $t)
      (f64.mul
        (f64.mul (local.get $t) (local.get $z))
        (f64.add (f64.const -0.16666666666666666)          ;; -1/3!
          (f64.mul (local.get $z)
            (f64.add (f64.const 0.008333333333333333)      ;;  1/5!
              (f64.mul (local.get $z)
                (f64.add (f64.const -0.0001984126984126984)  ;; -1/7!
                  (f64.mul (local.get $z)
                    (f64.add (f64.const 2.7557319223985893e-06)  ;;  1/9!
                      (f64.mul (local.get $z)
                        (f64.add (f64.const -2.505210838544172e-08)  ;; -1/11!
                          (f64.mul (local.get $z)
                            (f64.add (f64.const 1.6059043836821613e-10)   ;;  1/13!
                              (f64.mul (local.get $z)
                                (f64.const -7.647163731819816e-13)))))))))))))))) ;; -1/15!

  ;; cos(theta) for |theta| <= pi/4, the Taylor polynomial of degree 16:
  ;; 1 + theta^2 (-1/2! + theta^2 (1/4! + theta^2 (-1/6! + ...)))
  (func $cos_poly (param $t f64) (result f64)
    (local $z f64)
    (local.set $z (f64.mul (local.get $t) (local.get $t)))
    (f64.add
      (f64.const 1)
      (f64.mul (local.get $z)
        (f64.add (f64.const -0.5)                          ;; -1/2!
          (f64.mul (local.get $z)
            (f64.add (f64.const 0.041666666666666664)      ;;  1/4!
              (f64.mul (local.get $z)
                (f64.add (f64.const -0.001388888888888889)   ;; -1/6!
                  (f64.mul (local.get $z)
                    (f64.add (f64.const 2.48015873015873e-05)    ;;  1/8!
                      (f64.mul (local.get $z)
                        (f64.add (f64.const -2.755731922398589e-07)  ;; -1/10!
                          (f64.mul (local.get $z)
                            (f64.add (f64.const 2.08767569878681e-09)   ;;  1/12!
                              (f64.mul (local.get $z)
                                (f64.add (f64.const -1.1470745597729725e-11)  ;; -1/14!
                                  (f64.mul (local.get $z)
                                    (f64.const 4.779477332387385e-14)))))))))))))))))) ;; 1/16!

  ;; (sin(2 pi x), cos(2 pi x)) for a finite x in turns.
  (func $sincos_turns (param $x f64) (result f64 f64)
    (local $x4 f64)
    (local $q f64)
    (local $theta f64)
    (local $s f64)
    (local $c f64)
    (local $quadrant i32)
    (local $sin f64)
    (local $cos f64)
    (local.set $x4 (f64.mul (local.get $x) (f64.const 4)))
    (local.set $q (f64.nearest (local.get $x4)))
    (local.set $theta
      (f64.mul (f64.sub (local.get $x4) (local.get $q))
               (f64.const 1.5707963267948966)))             ;; pi/2
    (local.set $s (call $sin_poly (local.get $theta)))
    (local.set $c (call $cos_poly (local.get $theta)))
    ;; q mod 4 (q is a whole number; for x in [0, 1) it is 0..4)
    (local.set $quadrant (i32.and (i32.trunc_f64_s (local.get $q)) (i32.const 3)))
    ;; rotate (sin, cos) by quadrant * 90 degrees
    (if (i32.eq (local.get $quadrant) (i32.const 0))
      (then (local.set $sin (local.get $s))
            (local.set $cos (local.get $c))))
    (if (i32.eq (local.get $quadrant) (i32.const 1))
      (then (local.set $sin (local.get $c))
            (local.set $cos (f64.neg (local.get $s)))))
    (if (i32.eq (local.get $quadrant) (i32.const 2))
      (then (local.set $sin (f64.neg (local.get $s)))
            (local.set $cos (f64.neg (local.get $c)))))
    (if (i32.eq (local.get $quadrant) (i32.const 3))
      (then (local.set $sin (f64.neg (local.get $c)))
            (local.set $cos (local.get $s))))
    ;; adding +0 turns a -0 (the sine at noon, say) into +0
    (f64.add (local.get $sin) (f64.const 0))
    (f64.add (local.get $cos) (f64.const 0)))

  ;; ---------------------------------------------------------------------------
  ;; A geohash cell index along one axis: halve [lo, hi] `bits` times, each
  ;; time a 1 bit when v is in the upper half (v >= mid), else a 0 bit. The
  ;; midpoints are dyadic fractions of 180 and 360 degrees, exact in f64, so
  ;; every comparison is exact; the top edge (90, 180) is in the last cell.
  (func $geocell (param $v f64) (param $lo f64) (param $hi f64) (param $bits i32)
                 (result f64)
    (local $index f64)
    (local $mid f64)
    (block $done
      (loop $halve
        (br_if $done (i32.eqz (local.get $bits)))
        (local.set $mid (f64.mul (f64.add (local.get $lo) (local.get $hi)) (f64.const 0.5)))
        (if (f64.ge (local.get $v) (local.get $mid))
          (then
            (local.set $index (f64.add (f64.mul (local.get $index) (f64.const 2)) (f64.const 1)))
            (local.set $lo (local.get $mid)))
          (else
            (local.set $index (f64.mul (local.get $index) (f64.const 2)))
            (local.set $hi (local.get $mid))))
        (local.set $bits (i32.sub (local.get $bits) (i32.const 1)))
        (br $halve)))
    (local.get $index))

  ;; ---------------------------------------------------------------------------
  ;; shoal_extract(inputs, outputs, count): records are rows of 4 f64 (32
  ;; bytes) at `inputs`, features rows of 6 f64 (48 bytes) at `outputs`.
  ;; Returns 0, or k when record k - 1 is refused.
  (func (export "shoal_extract") (param $in i32) (param $out i32) (param $count i32)
                                 (result i32)
    (local $i i32)
    (local $ts f64)
    (local $lat f64)
    (local $lon f64)
    (local $battery f64)
    (local $t f64)
    (local $day f64)
    (local $ms f64)
    (local $weekday f64)
    (local $sin f64)
    (local $cos f64)
    (block $done
      (loop $record
        (br_if $done (i32.ge_s (local.get $i) (local.get $count)))
        (local.set $ts (f64.load offset=0 (local.get $in)))
        (local.set $lat (f64.load offset=8 (local.get $in)))
        (local.set $lon (f64.load offset=16 (local.get $in)))
        (local.set $battery (f64.load offset=24 (local.get $in)))

        ;; Refusals. Each test is written so that NaN fails it (every
        ;; comparison with NaN is false).
        (if (i32.eqz
              (i32.and
                (i32.and
                  (f64.le (f64.abs (local.get $ts)) (f64.const 8.64e15))
                  (f64.eq (local.get $battery) (local.get $battery)))
                (i32.and
                  (i32.and (f64.ge (local.get $lat) (f64.const -90))
                           (f64.le (local.get $lat) (f64.const 90)))
                  (i32.and (f64.ge (local.get $lon) (f64.const -180))
                           (f64.le (local.get $lon) (f64.const 180))))))
          (then (return (i32.add (local.get $i) (i32.const 1)))))

        ;; Time. t is whole milliseconds (a fraction is dropped: floor, so
        ;; -0.5 is 1969-12-31T23:59:59.999). day = floor(t / 86400000) is
        ;; exact: |t| <= 8.64e15, so |day| <= 1e8 < 2^27, where f64 spacing is
        ;; at most 2^-26 while t / 86400000 stays at least 1/86400000 below
        ;; the next whole number, so the division cannot round up onto it.
        ;; day * 86400000 < 2^53 is exact, and so is ms, the milliseconds
        ;; since midnight UTC, a whole number in [0, 86400000).
        (local.set $t (f64.floor (local.get $ts)))
        (local.set $day (f64.floor (f64.div (local.get $t) (f64.const 86400000))))
        (local.set $ms (f64.sub (local.get $t) (f64.mul (local.get $day) (f64.const 86400000))))
        ;; the time of day in turns: ms / 86400000 = h / 24
        (call $sincos_turns (f64.div (local.get $ms) (f64.const 86400000)))
        (local.set $cos)
        (local.set $sin)
        ;; Day 0, 1970-01-01, was a Thursday. weekday = (day + 3) mod 7 with
        ;; a floor (never negative), 0 = Monday .. 5 = Saturday, 6 = Sunday.
        (local.set $day (f64.add (local.get $day) (f64.const 3)))
        (local.set $weekday
          (f64.sub (local.get $day)
                   (f64.mul (f64.floor (f64.div (local.get $day) (f64.const 7)))
                            (f64.const 7))))

        (f64.store offset=0 (local.get $out) (local.get $sin))        ;; hour_sin
        (f64.store offset=8 (local.get $out) (local.get $cos))        ;; hour_cos
        (f64.store offset=16 (local.get $out)                         ;; is_weekend
          (f64.convert_i32_u (f64.ge (local.get $weekday) (f64.const 5))))
        (f64.store offset=24 (local.get $out)                         ;; battery_bucket
          (f64.min
            (f64.max (f64.floor (f64.mul (local.get $battery) (f64.const 10)))
                     (f64.const 0))
            (f64.const 9)))
        ;; geohash precision 5 = 25 bits, interleaved starting with longitude:
        ;; 13 longitude bits and 12 latitude bits
        (f64.store offset=32 (local.get $out)                         ;; geocell_lat
          (f64.div (call $geocell (local.get $lat) (f64.const -90) (f64.const 90) (i32.const 12))
                   (f64.const 4095)))
        (f64.store offset=40 (local.get $out)                         ;; geocell_lon
          (f64.div (call $geocell (local.get $lon) (f64.const -180) (f64.const 180) (i32.const 13))
                   (f64.const 8191)))

        (local.set $in (i32.add (local.get $in) (i32.const 32)))
        (local.set $out (i32.add (local.get $out) (i32.const 48)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $record)))
    (i32.const 0))
)
