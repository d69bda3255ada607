# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Compiled parts of the exact boundary matcher: sparse thinning and Hopcroft-Karp.

Both loops run without the GIL, so images can be evaluated in threads.
See `boundary.py` for the protocol and for why this is a Cython extension.
"""

import numpy as np

cdef int UNREACHED = 2147483647


cdef Py_ssize_t _thin(unsigned char* image, Py_ssize_t stride, Py_ssize_t* pixels,
                      Py_ssize_t count, const unsigned char* lut_first,
                      const unsigned char* lut_second, Py_ssize_t* deleted) noexcept nogil:
  """Thins `image` (0/1, zero border) in place; `pixels` lists its ones and is compacted."""
  cdef bint changed = True
  cdef Py_ssize_t i, j, p, removed
  cdef int sub_iteration
  cdef unsigned int code
  cdef const unsigned char* lut
  while changed:
    changed = False
    for sub_iteration in range(2):
      lut = lut_first if sub_iteration == 0 else lut_second
      removed = 0
      for i in range(count):
        p = pixels[i]
        # Neighbour bits counterclockwise from east, as skimage's correlation mask.
        code = (image[p + 1] | image[p - stride + 1] << 1 | image[p - stride] << 2 |
                image[p - stride - 1] << 3 | image[p - 1] << 4 | image[p + stride - 1] << 5 |
                image[p + stride] << 6 | image[p + stride + 1] << 7)
        if lut[code]:
          deleted[removed] = p
          removed += 1
      if removed == 0:
        continue
      changed = True
      for i in range(removed):
        image[deleted[i]] = 0
      j = 0
      for i in range(count):
        if image[pixels[i]]:
          pixels[j] = pixels[i]
          j += 1
      count = j
  return count


def thin_in_place(unsigned char[::1] image, Py_ssize_t stride, Py_ssize_t[::1] pixels,
                  const unsigned char[::1] lut_first, const unsigned char[::1] lut_second):
  """Thins a flattened 0/1 image with a zero border whose ones are `pixels`.

  Returns the number of pixels left; they are the first entries of `pixels`.
  """
  cdef Py_ssize_t[::1] deleted = np.empty(max(pixels.shape[0], 1), np.intp)
  cdef Py_ssize_t left
  with nogil:
    left = _thin(&image[0], stride, &pixels[0] if pixels.shape[0] else NULL,
                 pixels.shape[0], &lut_first[0], &lut_second[0], &deleted[0])
  return left


def neighbour_graph(const int[::1] rows, const int[::1] cols, const int[:, ::1] target_index,
                    const int[::1] offset_rows, const int[::1] offset_cols):
  """CSR adjacency (indptr, indices) from each (row, col) to the targets at the offsets."""
  cdef Py_ssize_t n = rows.shape[0], n_offsets = offset_rows.shape[0]
  cdef Py_ssize_t height = target_index.shape[0], width = target_index.shape[1]
  cdef Py_ssize_t i, k, r, c, edges = 0
  cdef int target
  indptr_array = np.zeros(n + 1, np.int32)
  cdef int[::1] indptr = indptr_array
  with nogil:
    for i in range(n):
      for k in range(n_offsets):
        r = rows[i] + offset_rows[k]
        c = cols[i] + offset_cols[k]
        if 0 <= r < height and 0 <= c < width and target_index[r, c] >= 0:
          edges += 1
      indptr[i + 1] = <int>edges
  indices_array = np.empty(edges, np.int32)
  cdef int[::1] indices = indices_array
  edges = 0
  with nogil:
    for i in range(n):
      for k in range(n_offsets):
        r = rows[i] + offset_rows[k]
        c = cols[i] + offset_cols[k]
        if 0 <= r < height and 0 <= c < width:
          target = target_index[r, c]
          if target >= 0:
            indices[edges] = target
            edges += 1
  return indptr_array, indices_array


cdef Py_ssize_t _hopcroft_karp(Py_ssize_t n_left, const unsigned char* active,
                               const int* indptr, const int* indices, int* match_left,
                               int* match_right, int* layer, int* queue, int* next_edge,
                               int* stack) noexcept nogil:
  cdef Py_ssize_t matched = 0, head, tail, u, e, top, k
  cdef int limit, x, v, w, y
  # Greedy start: each active vertex takes its first free neighbour.
  for u in range(n_left):
    if not active[u]:
      continue
    for e in range(indptr[u], indptr[u + 1]):
      if match_right[indices[e]] < 0:
        match_left[u] = indices[e]
        match_right[indices[e]] = <int>u
        matched += 1
        break
  while True:
    # Breadth-first layers from the free active vertices up to the nearest free target.
    head = tail = 0
    for u in range(n_left):
      if active[u] and match_left[u] < 0:
        layer[u] = 0
        queue[tail] = <int>u
        tail += 1
      else:
        layer[u] = UNREACHED
    limit = UNREACHED
    while head < tail:
      x = queue[head]
      head += 1
      if layer[x] >= limit:
        break
      for e in range(indptr[x], indptr[x + 1]):
        w = match_right[indices[e]]
        if w < 0:
          if limit == UNREACHED:
            limit = layer[x] + 1
        elif layer[w] == UNREACHED:
          layer[w] = layer[x] + 1
          queue[tail] = w
          tail += 1
    if limit == UNREACHED:
      return matched
    # Depth-first search of vertex-disjoint shortest augmenting paths; dead ends
    # leave the layering so that no vertex is searched twice in a phase.
    for u in range(n_left):
      next_edge[u] = indptr[u]
    for u in range(n_left):
      if layer[u] != 0 or match_left[u] >= 0:
        continue
      top = 0
      stack[0] = <int>u
      while top >= 0:
        x = stack[top]
        if next_edge[x] == indptr[x + 1]:
          layer[x] = UNREACHED
          top -= 1
          continue
        v = indices[next_edge[x]]
        next_edge[x] += 1
        w = match_right[v]
        if w < 0:
          if layer[x] + 1 == limit:
            for k in range(top, -1, -1):
              y = stack[k]
              v = indices[next_edge[y] - 1]
              match_left[y] = v
              match_right[v] = y
              layer[y] = UNREACHED
            matched += 1
            break
        elif layer[w] == layer[x] + 1:
          top += 1
          stack[top] = w


def maximum_matching(const unsigned char[::1] active, const int[::1] indptr,
                     const int[::1] indices, Py_ssize_t n_right):
  """Size of a maximum matching of the active left vertices (Hopcroft-Karp).

  Returns (size, match_left) with match_left[u] the matched target or -1.
  """
  cdef Py_ssize_t n_left = active.shape[0]
  match_left_array = np.full(n_left, -1, np.int32)
  match_right_array = np.full(max(n_right, 1), -1, np.int32)
  cdef int[::1] match_left = match_left_array, match_right = match_right_array
  cdef int[::1] layer = np.empty(max(n_left, 1), np.int32)
  cdef int[::1] queue = np.empty(max(n_left, 1), np.int32)
  cdef int[::1] next_edge = np.empty(max(n_left, 1), np.int32)
  cdef int[::1] stack = np.empty(max(n_left, 1), np.int32)
  cdef Py_ssize_t matched = 0
  if n_left == 0 or n_right == 0:
    return 0, match_left_array
  with nogil:
    matched = _hopcroft_karp(n_left, &active[0], &indptr[0],
                             &indices[0] if indices.shape[0] else NULL, &match_left[0],
                             &match_right[0], &layer[0], &queue[0], &next_edge[0], &stack[0])
  return matched, match_left_array
