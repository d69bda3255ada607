"""Procedurally generated multi-task world: the project's embedded dataset.

Each scene is a closed room (floor, four walls, ceiling) holding a few objects
(balls, boxes, cylinders, tables) and, in about two scenes out of three, an
articulated person built from primitives. A pinhole camera with jittered
position, yaw, pitch, roll and field of view ray-casts it analytically, so all
six labels come from the same ray hits and agree with each other exactly;
the image is shaded from those hits (point light, Lambertian plus ambient,
per-class textures, noise) so every task is learnable from pixels alone.

Conventions:
  Camera frame: x to the right of the image, y up, z towards the viewer
    (OpenGL). A pixel (row i, column j) sees the ray through
    ((j + 0.5 - cx) / f, -(i + 0.5 - cy) / f, -1), with the intrinsics
    K = [[f, 0, cx], [0, f, cy], [0, 0, 1]] in OpenCV pixel units.
  depth: z-depth along the optical axis in metres (minus the camera-frame z),
    > 0 everywhere because the room is closed.
  normals: unit, camera frame, facing the camera (dot with the pixel's ray
    < 0; n_z is mostly > 0 but can be negative on surfaces seen obliquely near
    the image border, e.g. the ceiling when the camera looks down); x is the
    horizontal image axis, which is what a horizontal flip negates.
  edge: a 4-neighbour pair is a boundary where the semantic class or the
    object instance changes, or where two different surfaces meet with a
    relative depth jump above DEPTH_JUMP (an object occluding part of
    itself); the nearer pixel of the pair is marked and the map is thinned to
    one pixel (Guo-Hall, `thinning.thin`). Walls are separate instances, so room corners are
    edges; box creases and flat textures are not.
  sal: 1 on every object and the person, 0 on the room.
  human_parts: PART_NAMES ids on the person, 0 elsewhere.

A scene depends only on its seed: rendering it at two resolutions gives the
same world (only the image noise differs).
"""

from __future__ import annotations

import colorsys
import dataclasses
import functools
from typing import Callable

import numpy as np

from cmtdp_jax import thinning

CLASS_NAMES = ('floor', 'wall', 'ceiling', 'ball', 'box', 'cylinder', 'table', 'person')
FLOOR, WALL, CEILING, BALL, BOX, CYLINDER, TABLE, PERSON = range(len(CLASS_NAMES))
ROOM_CLASSES = (FLOOR, WALL, CEILING)

PART_NAMES = ('background', 'head', 'torso', 'upper_arm', 'lower_arm', 'upper_leg',
              'lower_leg')
HEAD, TORSO, UPPER_ARM, LOWER_ARM, UPPER_LEG, LOWER_LEG = range(1, len(PART_NAMES))

NUM_CLASSES = {'semseg': len(CLASS_NAMES), 'human_parts': len(PART_NAMES)}

# Relative depth difference between neighbouring pixels of different surfaces
# that counts as an occlusion edge.
DEPTH_JUMP = 0.05

PERSON_PROBABILITY = 0.65


# ----------------------------------------------------------------------------
# Primitives. Each intersects rays origin + t * dirs (dirs [..., 3], not unit:
# camera rays have camera-frame z = -1 so t is the z-depth; origin [3] or one
# per ray) and returns t > 0 (inf on a miss) and the outward unit normal at
# the hit; `bounds` gives its world-axis-aligned box (low, high).


@dataclasses.dataclass(frozen=True)
class _Sphere:
  center: np.ndarray
  radius: float

  def bounds(self):
    return self.center - self.radius, self.center + self.radius

  def intersect(self, origin, dirs):
    offset = origin - self.center
    a = _dot(dirs, dirs)
    half_b = _dot(dirs, offset)
    disc = half_b * half_b - a * (_dot(offset, offset) - self.radius ** 2)
    t = (-half_b - np.sqrt(np.maximum(disc, 0.0))) / a
    t = np.where((disc >= 0) & (t > 0), t, np.inf)
    normal = (origin + np.where(np.isfinite(t), t, 0.0)[..., None] * dirs
              - self.center) / self.radius
    return t, normal


@dataclasses.dataclass(frozen=True)
class _Box:
  """Oriented box: `axes` columns are its local axes in the world."""
  center: np.ndarray
  axes: np.ndarray
  half: np.ndarray

  def bounds(self):
    extent = np.abs(self.axes) @ self.half
    return self.center - extent, self.center + extent

  def intersect(self, origin, dirs):
    local_origin = (origin - self.center) @ self.axes
    local_dirs = dirs @ self.axes
    with np.errstate(divide='ignore', invalid='ignore'):
      inverse = 1.0 / local_dirs
      t1 = (-self.half - local_origin) * inverse
      t2 = (self.half - local_origin) * inverse
    near, far = np.minimum(t1, t2), np.maximum(t1, t2)
    enter, axis = _max_and_axis(near)
    leave = -_max_and_axis(-far)[0]
    t = np.where((enter <= leave) & (enter > 0), enter, np.inf)
    local_normal = -np.sign(local_dirs) * (axis[..., None] == np.arange(3))
    return t, local_normal @ self.axes.T


@dataclasses.dataclass(frozen=True)
class _Cylinder:
  """Cylinder from `base` along unit `axis`; uncapped ones are capsule bodies."""
  base: np.ndarray
  axis: np.ndarray
  length: float
  radius: float
  capped: bool = True

  def bounds(self):
    end = self.base + self.length * self.axis
    extent = self.radius * np.sqrt(np.maximum(1 - self.axis ** 2, 0))
    return np.minimum(self.base, end) - extent, np.maximum(self.base, end) + extent

  @functools.cached_property
  def basis(self):
    """Columns u, axis, w: an orthonormal frame around the axis."""
    helper = np.array([1.0, 0, 0]) if abs(self.axis[0]) < 0.9 else np.array([0, 0, 1.0])
    u = np.cross(self.axis, helper)
    u /= np.linalg.norm(u)
    return np.stack([u, self.axis, np.cross(u, self.axis)], axis=1)

  def intersect(self, origin, dirs):
    basis = self.basis
    o = (origin - self.base) @ basis
    d = dirs @ basis
    a = d[..., 0] ** 2 + d[..., 2] ** 2
    half_b = o[..., 0] * d[..., 0] + o[..., 2] * d[..., 2]
    disc = half_b * half_b - a * (o[..., 0] ** 2 + o[..., 2] ** 2 - self.radius ** 2)
    with np.errstate(divide='ignore', invalid='ignore'):
      t = (-half_b - np.sqrt(np.maximum(disc, 0.0))) / a
    height = o[..., 1] + t * d[..., 1]
    t = np.where((disc >= 0) & (t > 0) & (height >= 0) & (height <= self.length), t,
                 np.inf)
    hit = o + np.where(np.isfinite(t), t, 0.0)[..., None] * d
    local_normal = hit * np.array([1.0, 0.0, 1.0]) / self.radius
    if self.capped:
      for level, cap_normal in ((0.0, -1.0), (self.length, 1.0)):
        with np.errstate(divide='ignore', invalid='ignore'):
          t_cap = (level - o[..., 1]) / d[..., 1]
        cap_hit = o + np.where(np.isfinite(t_cap), t_cap, 0.0)[..., None] * d
        inside = cap_hit[..., 0] ** 2 + cap_hit[..., 2] ** 2 <= self.radius ** 2
        closer = inside & (t_cap > 0) & (t_cap < t)
        t = np.where(closer, t_cap, t)
        local_normal = np.where(closer[..., None], [0.0, cap_normal, 0.0], local_normal)
    return t, local_normal @ basis.T


# ----------------------------------------------------------------------------
# Scene description.


@dataclasses.dataclass
class _Object:
  """One instance: its surfaces (primitive, part id) and how to colour them.

  `paint(points, surface)` gets world hit points [N, 3] and the index of the
  surface each was hit on, and returns albedo [N, 3] in [0, 1].
  """
  class_id: int
  surfaces: list
  paint: Callable[[np.ndarray, np.ndarray], np.ndarray]
  footprint: tuple[float, float, float] = (0.0, 0.0, 0.0)  # x, z, radius on the floor
  specular: float = 0.0
  shininess: float = 30.0

  @functools.cached_property
  def boxes(self):
    """World bounding boxes of the surfaces [K, 2 (low, high), 3]."""
    return np.array([primitive.bounds() for primitive, _ in self.surfaces])


@dataclasses.dataclass
class _Camera:
  origin: np.ndarray
  rotation: np.ndarray  # columns: camera x, y, z axes in the world
  horizontal_fov: float

  def intrinsics(self, height, width):
    focal = 0.5 * width / np.tan(0.5 * self.horizontal_fov)
    return np.array([[focal, 0, 0.5 * width], [0, focal, 0.5 * height], [0, 0, 1]])


@dataclasses.dataclass
class _Scene:
  camera: _Camera
  room_low: np.ndarray
  room_high: np.ndarray
  room: list  # six _Objects, one per face, in the order of `_room`
  objects: list
  light_position: np.ndarray
  light_colour: np.ndarray
  ambient: float


def _max_and_axis(values):
  """Maximum over a last axis of size 3 and its index (numpy's reductions over
  tiny trailing axes are slow)."""
  x, y, z = values[..., 0], values[..., 1], values[..., 2]
  best = np.maximum(np.maximum(x, y), z)
  return best, np.where(x == best, 0, np.where(y == best, 1, 2))


def _dot(a, b):
  return np.einsum('...k,...k->...', a, b)


def _rotation_y(angle):
  c, s = np.cos(angle), np.sin(angle)
  return np.array([[c, 0, s], [0, 1.0, 0], [-s, 0, c]])


def _rotation_x(angle):
  c, s = np.cos(angle), np.sin(angle)
  return np.array([[1.0, 0, 0], [0, c, -s], [0, s, c]])


def _rotation_z(angle):
  c, s = np.cos(angle), np.sin(angle)
  return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


def _hsv(rng, hue, saturation, value):
  """RGB colour with hue (degrees), saturation and value drawn from ranges."""
  h = (rng.uniform(*hue) % 360.0) / 360.0
  return np.array(colorsys.hsv_to_rgb(h, rng.uniform(*saturation), rng.uniform(*value)))


def _value_noise(u, v, lattice):
  """Smooth noise in [0, 1] at coordinates (u, v) on a periodic random lattice."""
  n = lattice.shape[0]
  iu, iv = np.floor(u), np.floor(v)
  fu, fv = u - iu, v - iv
  fu, fv = fu * fu * (3 - 2 * fu), fv * fv * (3 - 2 * fv)
  i0, j0 = iu.astype(np.int64) % n, iv.astype(np.int64) % n
  i1, j1 = (i0 + 1) % n, (j0 + 1) % n
  top = lattice[i0, j0] * (1 - fu) + lattice[i1, j0] * fu
  bottom = lattice[i0, j1] * (1 - fu) + lattice[i1, j1] * fu
  return top * (1 - fv) + bottom * fv


def _lattice(rng):
  return rng.random((16, 16))


# ----------------------------------------------------------------------------
# Room.

_FLOOR_FACE = 2  # faces are numbered 2 * axis + (ray direction > 0)


def _room(rng):
  """Six face objects: left, right wall, floor, ceiling, back, front wall."""
  floor_style = rng.choice(['tiles', 'planks', 'carpet'])
  tile = rng.uniform(0.3, 0.8)
  floor_a = _hsv(rng, (15, 45), (0.2, 0.6), (0.35, 0.8))
  floor_b = floor_a * rng.uniform(0.55, 0.85) if rng.random() < 0.6 else _hsv(
      rng, (0, 360), (0.0, 0.3), (0.3, 0.9))
  if floor_style == 'carpet':
    floor_a = _hsv(rng, (0, 360), (0.15, 0.55), (0.3, 0.7))
  plank_axis = rng.integers(2) * 2
  floor_noise = _lattice(rng)

  def paint_floor(points, surface):
    del surface
    x, z = points[:, 0], points[:, 2]
    if floor_style == 'tiles':
      u, v = x / tile, z / tile
      parity = (np.floor(u) + np.floor(v)) % 2
      albedo = np.where(parity[:, None] > 0, floor_a, floor_b)
      grout = (np.abs(u - np.round(u)) < 0.04) | (np.abs(v - np.round(v)) < 0.04)
      albedo = np.where(grout[:, None], 0.5 * floor_a, albedo)
    elif floor_style == 'planks':
      across, along = points[:, plank_axis], points[:, 2 - plank_axis]
      plank = np.floor(across / (0.25 * tile))
      shade = 0.75 + 0.25 * floor_noise[(plank.astype(np.int64) * 7) % 16, 3]
      grain = 0.9 + 0.1 * np.sin(along * 9.0 + 3 * _value_noise(along, across * 4, floor_noise))
      albedo = floor_a * (shade * grain)[:, None]
      seam = np.abs(across / (0.25 * tile) - np.round(across / (0.25 * tile))) < 0.05
      albedo = np.where(seam[:, None], 0.55 * floor_a, albedo)
    else:
      fine = _value_noise(x * 25, z * 25, floor_noise)
      albedo = floor_a * (0.8 + 0.3 * fine)[:, None]
    return albedo

  wall_style = rng.choice(['plain', 'stripes', 'wainscot'])
  wall_a = _hsv(rng, (0, 360), (0.05, 0.35), (0.55, 0.95))
  wall_b = np.clip(wall_a * rng.uniform(0.75, 0.92) + rng.uniform(-0.05, 0.05, 3), 0, 1)
  stripe = rng.uniform(0.08, 0.3)
  wainscot_height = rng.uniform(0.7, 1.1)
  baseboard = _hsv(rng, (0, 360), (0.0, 0.2), (0.1, 0.95))
  wall_noise = _lattice(rng)
  wall_tint = rng.uniform(0.9, 1.05, 6)

  def paint_wall(face):
    def paint(points, surface):
      del surface
      across = points[:, 2] if face < 2 else points[:, 0]
      y = points[:, 1]
      if wall_style == 'stripes':
        albedo = np.where((np.floor(across / stripe) % 2)[:, None] > 0, wall_a, wall_b)
      elif wall_style == 'wainscot':
        albedo = np.where((y < wainscot_height)[:, None], wall_b, wall_a)
      else:
        albedo = np.broadcast_to(wall_a, points.shape)
      albedo = albedo * (0.92 + 0.12 * _value_noise(across * 1.5, y * 1.5, wall_noise))[:, None]
      albedo = np.where((y < 0.1)[:, None], baseboard, albedo)
      return albedo * wall_tint[face]
    return paint

  ceiling = _hsv(rng, (0, 360), (0.0, 0.1), (0.8, 1.0))
  panel = rng.uniform(0.5, 1.2) if rng.random() < 0.5 else 0.0

  def paint_ceiling(points, surface):
    del surface
    albedo = np.broadcast_to(ceiling, points.shape)
    if panel:
      u, v = points[:, 0] / panel, points[:, 2] / panel
      seam = (np.abs(u - np.round(u)) < 0.03) | (np.abs(v - np.round(v)) < 0.03)
      albedo = np.where(seam[:, None], 0.7 * ceiling, albedo)
    return albedo

  classes = (WALL, WALL, FLOOR, CEILING, WALL, WALL)
  painters = (paint_wall(0), paint_wall(1), paint_floor, paint_ceiling, paint_wall(4),
              paint_wall(5))
  return [_Object(c, [], p) for c, p in zip(classes, painters)]


def _cast_room(origin, dirs, low, high):
  """Exit hit of rays from inside the room box; face id as in `_room`."""
  with np.errstate(divide='ignore', invalid='ignore'):
    t_axes = np.where(dirs > 0, high - origin, low - origin) / dirs
  t_axes = np.where(t_axes > 0, t_axes, np.inf)  # rays parallel to a face never exit there
  negative_t, axis = _max_and_axis(-t_axes)
  exits = (axis[..., None] == np.arange(3)).astype(dirs.dtype)
  positive = _dot(dirs, exits) > 0
  return -negative_t, -np.sign(dirs) * exits, 2 * axis + positive


# ----------------------------------------------------------------------------
# Objects.


def _ball(rng, x, z, radius):
  colour = _hsv(rng, (0, 240), (0.5, 0.95), (0.55, 0.95))
  second = _hsv(rng, (0, 360), (0.0, 0.9), (0.6, 1.0))
  center = np.array([x, radius, z])
  pattern = rng.choice(['plain', 'plain', 'segments', 'band'])
  spin = _rotation_y(rng.uniform(0, 2 * np.pi)) @ _rotation_x(rng.uniform(-0.6, 0.6))

  def paint(points, surface):
    del surface
    local = (points - center) @ spin / radius
    if pattern == 'segments':
      second_colour = (np.floor(np.arctan2(local[:, 2], local[:, 0]) / (np.pi / 3)) % 2) > 0
    elif pattern == 'band':
      second_colour = np.abs(local[:, 1]) < 0.25
    else:
      return np.broadcast_to(colour, points.shape)
    return np.where(second_colour[:, None], second, colour)

  return _Object(BALL, [(_Sphere(center, radius), 0)], paint, (x, z, radius),
                 specular=rng.uniform(0.2, 0.6), shininess=rng.uniform(15, 60))


def _box(rng, x, z, half, yaw):
  if rng.random() < 0.5:
    colour = _hsv(rng, (22, 38), (0.35, 0.65), (0.45, 0.8))  # cardboard
  else:
    colour = _hsv(rng, (15, 200), (0.2, 0.8), (0.3, 0.9))
  axes = _rotation_y(yaw)
  center = np.array([x, half[1], z])
  border = rng.uniform(0.02, 0.05)
  tape = rng.random() < 0.4
  noise = _lattice(rng)

  def paint(points, surface):
    del surface
    local = (points - center) @ axes
    closeness = np.sort(np.abs(local) - half, axis=1)  # faces: largest ~0
    grain = 0.85 + 0.2 * _value_noise(local[:, 0] * 12 + local[:, 1] * 5,
                                      local[:, 2] * 12 - local[:, 1] * 7, noise)
    albedo = colour * grain[:, None]
    albedo = np.where((closeness[:, 1] > -border)[:, None], 0.6 * colour, albedo)
    if tape:
      albedo = np.where((np.abs(local[:, 0]) < 0.15 * half[0])[:, None],
                        0.85 * np.array([0.8, 0.75, 0.6]), albedo)
    return albedo

  return _Object(BOX, [(_Box(center, axes, half), 0)], paint,
                 (x, z, float(np.hypot(half[0], half[2]))), specular=0.05)


def _cylinder(rng, x, z, radius, length, yaw):
  colour = _hsv(rng, (120, 380), (0.3, 0.85), (0.4, 0.95))
  label = _hsv(rng, (0, 360), (0.0, 0.8), (0.3, 1.0))
  if rng.random() < 0.25:  # lying on its side
    axis = _rotation_y(yaw) @ np.array([1.0, 0, 0])
    base = np.array([x, radius, z]) - 0.5 * length * axis
    footprint = 0.5 * float(np.hypot(length, 2 * radius))
  else:
    axis = np.array([0, 1.0, 0])
    base = np.array([x, 0.0, z])
    footprint = radius
  band = sorted(rng.uniform(0.1, 0.9, 2)) if rng.random() < 0.6 else (2.0, 2.0)

  def paint(points, surface):
    del surface
    height = ((points - base) @ axis) / length
    in_band = (height > band[0]) & (height < band[1])
    return np.where(in_band[:, None], label, colour)

  return _Object(CYLINDER, [(_Cylinder(base, axis, length, radius), 0)], paint,
                 (x, z, footprint), specular=rng.uniform(0.1, 0.5),
                 shininess=rng.uniform(10, 40))


def _table(rng, x, z, half_width, half_depth, yaw):
  height = rng.uniform(0.6, 0.8)
  thickness = rng.uniform(0.03, 0.07)
  leg_radius = rng.uniform(0.02, 0.04)
  top_colour = _hsv(rng, (15, 45), (0.3, 0.7), (0.3, 0.75)) if rng.random() < 0.7 else _hsv(
      rng, (0, 360), (0.0, 0.15), (0.15, 0.95))
  leg_colour = top_colour if rng.random() < 0.5 else _hsv(rng, (0, 360), (0, 0.2), (0.1, 0.6))
  axes = _rotation_y(yaw)
  top_center = np.array([x, height - 0.5 * thickness, z])
  surfaces = [(_Box(top_center, axes, np.array([half_width, 0.5 * thickness, half_depth])), 0)]
  inset = leg_radius + 0.04
  for sx in (-1, 1):
    for sz in (-1, 1):
      foot = np.array([x, 0, z]) + axes @ np.array(
          [sx * (half_width - inset), 0, sz * (half_depth - inset)])
      surfaces.append((_Cylinder(foot, np.array([0, 1.0, 0]), height - thickness,
                                 leg_radius), 0))
  noise = _lattice(rng)

  def paint(points, surface):
    local = (points - top_center) @ axes
    grain = 0.85 + 0.15 * np.sin(local[:, 0] * 30 + 4 * _value_noise(
        local[:, 0] * 3, local[:, 2] * 20, noise))
    return np.where((surface == 0)[:, None], top_colour * grain[:, None], leg_colour)

  return _Object(TABLE, surfaces, paint, (x, z, float(np.hypot(half_width, half_depth))),
                 specular=0.1)


def _limb_direction(side, flex, abduct):
  """Unit limb direction in the person frame (x left/right, y up, z forward)."""
  return np.array([side * np.sin(abduct), -np.cos(abduct) * np.cos(flex),
                   np.cos(abduct) * np.sin(flex)])


def _person(rng, x, z, yaw):
  """Articulated person standing on the floor; surfaces carry PART_NAMES ids."""
  s = rng.uniform(1.45, 1.9)
  deg = np.deg2rad
  parts = []  # (kind, part, colour key, geometry in the person frame)

  def capsule(start, direction, length, radius, part, colour, start_ball=True, hand=False):
    """A limb; its start ball is left out where the previous limb's end covers it."""
    end = start + length * direction
    parts.append(('cylinder', part, colour, (start, direction, length, radius)))
    if start_ball:
      parts.append(('sphere', part, colour, (start, radius)))
    if hand:
      parts.append(('sphere', part, 'skin', (end, 1.2 * radius)))
    else:
      parts.append(('sphere', part, colour, (end, radius)))
    return end

  sleeves = rng.choice(['long', 'short', 'none'], p=[0.4, 0.45, 0.15])
  shorts = rng.random() < 0.3
  for side in (-1, 1):
    flex, abduct = deg(rng.uniform(-25, 40)), deg(rng.uniform(0, 15))
    knee = flex - deg(rng.uniform(0, 70))
    hip = np.array([side * 0.065 * s, 0.52 * s, 0])
    knee_point = capsule(hip, _limb_direction(side, flex, abduct), 0.245 * s, 0.05 * s,
                         UPPER_LEG, 'pants')
    ankle = capsule(knee_point, _limb_direction(side, knee, abduct), 0.245 * s, 0.036 * s,
                    LOWER_LEG, 'skin' if shorts else 'pants', start_ball=False)
    parts.append(('box', LOWER_LEG, 'shoes',
                  (ankle + np.array([0, -0.01 * s, 0.035 * s]),
                   np.array([0.03 * s, 0.022 * s, 0.065 * s]))))
    flex, abduct = deg(rng.uniform(-35, 110)), deg(rng.uniform(8, 75))
    elbow = flex + deg(rng.uniform(0, 120))
    shoulder = np.array([side * 0.15 * s, 0.785 * s, 0])
    elbow_point = capsule(shoulder, _limb_direction(side, flex, abduct), 0.17 * s, 0.034 * s,
                          UPPER_ARM, 'skin' if sleeves == 'none' else 'shirt')
    capsule(elbow_point, _limb_direction(side, elbow, abduct), 0.17 * s, 0.027 * s,
            LOWER_ARM, 'shirt' if sleeves == 'long' else 'skin', start_ball=False, hand=True)
  parts.append(('box', TORSO, 'shirt',
                (np.array([0, 0.665 * s, 0]), np.array([0.125 * s, 0.155 * s, 0.07 * s]))))
  parts.append(('cylinder', HEAD, 'skin',
                (np.array([0, 0.8 * s, 0]), np.array([0, 1.0, 0]), 0.08 * s, 0.03 * s)))
  head_center = np.array([0, 0.925 * s, 0.005 * s])
  head_radius = 0.068 * s
  parts.append(('sphere', HEAD, 'skin', (head_center, head_radius)))

  lowest = min(g[0][1] - g[1] if kind == 'sphere' else g[0][1] - g[1][1]
               for kind, _, _, g in parts if kind in ('sphere', 'box'))
  rotation = _rotation_y(yaw)
  offset = np.array([x, -lowest, z])
  to_world = lambda p: rotation @ p + offset
  surfaces = []
  for kind, part, _, g in parts:
    if kind == 'sphere':
      primitive = _Sphere(to_world(g[0]), g[1])
    elif kind == 'box':
      primitive = _Box(to_world(g[0]), rotation, g[1])
    else:
      primitive = _Cylinder(to_world(g[0]), rotation @ g[1], g[2], g[3], capped=False)
    surfaces.append((primitive, part))

  palette = {
      'skin': _hsv(rng, (15, 35), (0.25, 0.6), (0.35, 0.95)),
      'shirt': _hsv(rng, (0, 360), (0.1, 0.9), (0.25, 0.95)),
      'pants': _hsv(rng, (200, 250), (0.2, 0.6), (0.15, 0.6)) if rng.random() < 0.5 else _hsv(
          rng, (0, 360), (0.0, 0.6), (0.15, 0.8)),
      'shoes': _hsv(rng, (0, 360), (0.0, 0.4), (0.05, 0.9)),
  }
  colours = np.array([palette[key] for _, _, key, _ in parts])
  shirt = np.array([key == 'shirt' for _, _, key, _ in parts])
  hair = _hsv(rng, (10, 40), (0.2, 0.8), (0.05, 0.5)) if rng.random() < 0.9 else None
  shirt_stripes = rng.uniform(0.03, 0.08) if rng.random() < 0.3 else 0.0
  world_head = to_world(head_center)
  forward = rotation @ np.array([0, 0, 1.0])
  head_index = len(parts) - 1

  def paint(points, surface):
    albedo = colours[surface]
    if hair is not None:
      relative = (points - world_head) / head_radius
      hairy = (surface == head_index) & ((relative[:, 1] > 0.35) | (relative @ forward < -0.2))
      albedo = np.where(hairy[:, None], hair, albedo)
    if shirt_stripes:
      stripe = (np.floor(points[:, 1] / shirt_stripes) % 2) > 0
      albedo = np.where((stripe & shirt[surface])[:, None], 0.6 * palette['shirt'], albedo)
    return albedo

  return _Object(PERSON, surfaces, paint, (x, z, 0.3 * s), specular=0.05)


# ----------------------------------------------------------------------------
# Scene sampling.


def _sample_scene(rng):
  half_width, depth, height = rng.uniform(2.0, 3.5), rng.uniform(5.0, 9.0), rng.uniform(2.5, 3.2)
  low, high = np.array([-half_width, 0, -depth]), np.array([half_width, height, 0])

  yaw = np.deg2rad(rng.uniform(-25, 25))
  rotation = (_rotation_y(yaw) @ _rotation_x(np.deg2rad(rng.uniform(-30, -5)))
              @ _rotation_z(np.deg2rad(rng.uniform(-3, 3))))
  origin = np.array([rng.uniform(-half_width + 0.7, half_width - 0.7), rng.uniform(1.0, 1.9),
                     rng.uniform(-0.9, -0.3)])
  fov = np.deg2rad(rng.uniform(55, 75))
  camera = _Camera(origin, rotation, fov)

  footprints = []

  def place(radius, near, far):
    """Floor position in the camera's view cone, clear of the walls and others."""
    for _ in range(30):
      distance = rng.uniform(near, far)
      heading = yaw + rng.uniform(-0.4, 0.4) * fov
      x = origin[0] - distance * np.sin(heading)
      z = origin[2] - distance * np.cos(heading)
      inside = (abs(x) < half_width - radius - 0.05) and (-depth + radius + 0.05 < z < -radius)
      clear = all(np.hypot(x - fx, z - fz) > radius + fr + 0.05 for fx, fz, fr in footprints)
      if inside and clear:
        footprints.append((x, z, radius))
        return x, z
    return None

  objects = []
  if rng.random() < PERSON_PROBABILITY:
    spot = place(0.45, 1.6, 4.0)
    if spot:
      objects.append(_person(rng, *spot, rng.uniform(0, 2 * np.pi)))
  for _ in range(rng.integers(3, 8)):
    kind = rng.choice([BALL, BOX, CYLINDER, TABLE], p=[0.3, 0.3, 0.25, 0.15])
    if kind == BALL:
      radius = rng.uniform(0.12, 0.4)
      spot = place(radius, 1.2, 4.5)
      if spot:
        objects.append(_ball(rng, *spot, radius))
    elif kind == BOX:
      half = rng.uniform([0.12, 0.12, 0.12], [0.45, 0.55, 0.45])
      spot = place(float(np.hypot(half[0], half[2])), 1.2, 4.5)
      if spot:
        objects.append(_box(rng, *spot, half, rng.uniform(0, np.pi)))
    elif kind == CYLINDER:
      radius, length = rng.uniform(0.1, 0.3), rng.uniform(0.3, 1.2)
      spot = place(max(radius, 0.5 * length), 1.2, 4.5)
      if spot:
        objects.append(_cylinder(rng, *spot, radius, length, rng.uniform(0, np.pi)))
    else:
      half_width_t, half_depth_t = rng.uniform(0.35, 0.75), rng.uniform(0.25, 0.45)
      spot = place(float(np.hypot(half_width_t, half_depth_t)), 1.5, 4.5)
      if spot:
        objects.append(_table(rng, *spot, half_width_t, half_depth_t, rng.uniform(0, np.pi)))

  light = np.array([rng.uniform(-0.8, 0.8) * half_width, height - 0.2,
                    rng.uniform(-0.9 * depth, -0.5)])
  light_colour = np.array([1.0, 1.0, 1.0]) + rng.uniform(-0.1, 0.1, 3)
  return _Scene(camera, low, high, _room(rng), objects, light, light_colour,
                rng.uniform(0.25, 0.45))


# ----------------------------------------------------------------------------
# Rendering.


_CORNERS = (np.arange(8)[:, None] >> np.arange(3)) & 1 > 0


def _pixel_windows(camera, intrinsics, boxes, height, width):
  """Per world box [K, 2, 3]: the pixel rows/columns that can see it, or None."""
  corners = np.where(_CORNERS, boxes[:, None, 1], boxes[:, None, 0])
  local = (corners - camera.origin) @ camera.rotation
  z = -local[..., 2]
  focal, cx, cy = intrinsics[0, 0], intrinsics[0, 2], intrinsics[1, 2]
  with np.errstate(divide='ignore', invalid='ignore'):
    u = cx + focal * local[..., 0] / z
    v = cy - focal * local[..., 1] / z
  col0 = np.floor(u.min(1) - 0.5).clip(0, width)
  col1 = (np.ceil(u.max(1) - 0.5) + 1).clip(0, width)
  row0 = np.floor(v.min(1) - 0.5).clip(0, height)
  row1 = (np.ceil(v.max(1) - 0.5) + 1).clip(0, height)
  windows = []
  for k in range(len(boxes)):
    if z[k].max() <= 0:
      windows.append(None)
    elif z[k].min() < 1e-3:  # straddles the camera plane
      windows.append((slice(0, height), slice(0, width)))
    elif col0[k] >= col1[k] or row0[k] >= row1[k]:
      windows.append(None)
    else:
      windows.append((slice(int(row0[k]), int(row1[k])), slice(int(col0[k]), int(col1[k]))))
  return windows


def _ray_directions(camera, intrinsics, height, width):
  focal, cx, cy = intrinsics[0, 0], intrinsics[0, 2], intrinsics[1, 2]
  u = (np.arange(width) + 0.5 - cx) / focal
  v = -(np.arange(height) + 0.5 - cy) / focal
  dirs = np.empty((height, width, 3))
  dirs[..., 0], dirs[..., 1], dirs[..., 2] = u[None, :], v[:, None], -1.0
  return dirs @ camera.rotation.T


def _cast(scene, dirs, intrinsics):
  """Nearest hit per pixel: z-depth, world normal, and global surface index."""
  height, width = dirs.shape[:2]
  origin = scene.camera.origin
  t, normal, surface = _cast_room(origin, dirs, scene.room_low, scene.room_high)
  index = len(scene.room)
  for obj in scene.objects:
    windows = _pixel_windows(scene.camera, intrinsics, obj.boxes, height, width)
    for (primitive, _), window in zip(obj.surfaces, windows):
      if window is not None:
        t_new, normal_new = primitive.intersect(origin, dirs[window])
        closer = t_new < t[window]
        t[window][closer] = t_new[closer]
        normal[window][closer] = normal_new[closer]
        surface[window][closer] = index
      index += 1
  return t, normal, surface


def _surface_tables(scene):
  """Per global surface index: class, instance, part, owner object, local index."""
  rows = [(obj.class_id, i, 0, i, 0) for i, obj in enumerate(scene.room)]
  for i, obj in enumerate(scene.objects, start=len(scene.room)):
    rows += [(obj.class_id, i, part, i, k) for k, (_, part) in enumerate(obj.surfaces)]
  return np.array(rows, np.int64).T


def _edges(semseg, instance, surface, depth):
  """Boundary map: see the module docstring for the rule."""
  def boundary(a, b):
    da, db = depth[a], depth[b]
    jump = np.abs(da - db) > DEPTH_JUMP * np.minimum(da, db)
    return ((semseg[a] != semseg[b]) | (instance[a] != instance[b])
            | ((surface[a] != surface[b]) & jump)), da <= db

  edge = np.zeros(depth.shape, bool)
  for first, second in (((slice(None), slice(None, -1)), (slice(None), slice(1, None))),
                        ((slice(None, -1), slice(None)), (slice(1, None), slice(None)))):
    changes, first_nearer = boundary(first, second)
    edge[first] |= changes & first_nearer
    edge[second] |= changes & ~first_nearer
  return thinning.thin(edge)


def _behind(light, boxes, directions, distances):
  """[N, K]: whether each point (unit direction and distance from the light)
  may be hidden from it by the bounding sphere of each world box [K, 2, 3]."""
  centers, radii = boxes.mean(1), 0.5 * np.linalg.norm(boxes[:, 1] - boxes[:, 0], axis=1)
  offsets = centers - light
  reach = np.linalg.norm(offsets, axis=1)
  cone = np.where(reach > radii, np.sqrt(np.maximum(1 - (radii / reach) ** 2, 0)), -2.0)
  return ((directions @ (offsets / reach[:, None]).T > cone)
          & (distances[:, None] > reach - radii))


def _in_shadow(objects, light, points, directions, distances):
  """Whether the segment from the light to each point hits an object.

  `directions` are the unit vectors from the light to the points. Bounding
  spheres cull first: whole objects over all points, then each primitive of a
  composite object over the points its object may hide.
  """
  blocked = np.zeros(len(points), bool)
  if not objects:
    return blocked
  wholes = np.array([(obj.boxes[:, 0].min(0), obj.boxes[:, 1].max(0)) for obj in objects])
  for obj, behind_object in zip(objects, _behind(light, wholes, directions, distances).T):
    near = np.flatnonzero(behind_object & ~blocked)
    if not near.size:
      continue
    behind = (_behind(light, obj.boxes, directions[near], distances[near])
              if len(obj.surfaces) > 1 else np.ones((len(near), 1), bool))
    for k, (primitive, _) in enumerate(obj.surfaces):
      candidates = near[behind[:, k] & ~blocked[near]]
      if candidates.size:
        starts = points[candidates] - 1e-4 * directions[candidates]  # off the surface
        blocked[candidates[primitive.intersect(starts, light - starts)[0] < 1]] = True
  return blocked


def _shade(scene, dirs, t, normal, owner, local, rng):
  """Albedo from the per-object painters, lit by a point light plus ambient."""
  points = (scene.camera.origin + t[..., None] * dirs).reshape(-1, 3)
  normals = normal.reshape(-1, 3)
  owner, local = owner.ravel(), local.ravel()
  to_light = scene.light_position - points
  squared_distance = _dot(to_light, to_light)
  distance = np.sqrt(squared_distance)
  to_light /= distance[:, None]
  falloff = 1.6 / (1.0 + squared_distance / 25.0)  # halves at 5 m from the light
  diffuse = np.maximum(_dot(normals, to_light), 0) * falloff
  ambient = np.full(owner.shape, scene.ambient)
  albedo = np.empty_like(points)
  highlight = np.zeros(owner.shape)
  lit = np.flatnonzero(diffuse > 0)
  shadowed = _in_shadow(scene.objects, scene.light_position, points[lit], -to_light[lit],
                        distance[lit])
  diffuse[lit[shadowed]] *= 0.2
  floor = np.flatnonzero(owner == _FLOOR_FACE)
  if scene.objects and floor.size:  # contact shadows under the objects
    footprints = np.array([obj.footprint for obj in scene.objects])
    gap = ((points[floor][:, None, [0, 2]] - footprints[:, :2])
           / (1.2 * footprints[:, 2:]))
    closeness = np.exp(-_dot(gap, gap) ** 2)
    ambient[floor] *= np.prod(1 - 0.5 * closeness, axis=1)
    diffuse[floor] *= np.prod(1 - 0.3 * closeness, axis=1)
  for i, obj in enumerate(scene.room + scene.objects):
    pixels = np.flatnonzero(owner == i)
    if not pixels.size:
      continue
    albedo[pixels] = obj.paint(points[pixels], local[pixels])
    if obj.specular:
      to_eye = -dirs.reshape(-1, 3)[pixels]
      halfway = to_light[pixels] + to_eye / np.sqrt(_dot(to_eye, to_eye))[:, None]
      cosine = _dot(normals[pixels], halfway) / np.sqrt(_dot(halfway, halfway))
      highlight[pixels] = (obj.specular * np.maximum(cosine, 0) ** obj.shininess
                           * (diffuse[pixels] > 0))
  colour = (albedo * (ambient + diffuse)[:, None] + highlight[:, None]) * scene.light_colour
  colour = np.sqrt(np.clip(colour, 0, 1)) * 255 + rng.integers(-4, 5, colour.shape)
  return np.clip(colour, 0, 255).astype(np.uint8).reshape(t.shape + (3,))


def render_scene(seed: int, height: int, width: int,
                 extras: bool = False) -> dict[str, np.ndarray]:
  """Renders scene `seed` at height x width pixels.

  Returns image uint8 [H, W, 3], semseg uint8 [H, W] (CLASS_NAMES ids),
  depth float32 [H, W] (metres), normals float32 [H, W, 3], edge, sal uint8
  [H, W] in {0, 1} and human_parts uint8 [H, W] (PART_NAMES ids). With
  `extras`, also the camera 'intrinsics' float32 [3, 3] and the object
  'instance' int32 [H, W] the edge rule uses (not dataset features).
  """
  rng = np.random.default_rng(seed)
  scene = _sample_scene(rng)
  intrinsics = scene.camera.intrinsics(height, width)
  dirs = _ray_directions(scene.camera, intrinsics, height, width)
  t, world_normal, surface = _cast(scene, dirs, intrinsics)
  classes, instances, parts, owners, locals_ = _surface_tables(scene)
  semseg, instance = classes[surface], instances[surface]
  depth = t.astype(np.float32)
  out = {
      'image': _shade(scene, dirs, t, world_normal, owners[surface], locals_[surface], rng),
      'semseg': semseg.astype(np.uint8),
      'depth': depth,
      'normals': (world_normal @ scene.camera.rotation).astype(np.float32),
      'edge': _edges(semseg, instance, surface, depth).astype(np.uint8),
      'sal': (~np.isin(semseg, ROOM_CLASSES)).astype(np.uint8),
      'human_parts': parts[surface].astype(np.uint8),
  }
  if extras:
    out['intrinsics'] = intrinsics.astype(np.float32)
    out['instance'] = instance.astype(np.int32)
  return out


def backproject(depth: np.ndarray, intrinsics: np.ndarray) -> np.ndarray:
  """Camera-frame 3D points [H, W, 3] of a z-depth map (convention above)."""
  height, width = depth.shape
  focal, cx, cy = intrinsics[0, 0], intrinsics[0, 2], intrinsics[1, 2]
  x = (np.arange(width) + 0.5 - cx) / focal
  y = -(np.arange(height) + 0.5 - cy) / focal
  return np.stack([depth * x[None, :], depth * y[:, None], -depth], axis=-1)
