// Translation unit that carries the precompiled torch header (cmake/WickPch.cmake).
