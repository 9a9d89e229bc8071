# Install and export like google/benchmark: headers, the library, an export
# set under the wick:: namespace, wickConfig.cmake and its version file; and
# the same config in the build tree so find_package(wick) works from there.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(WICK_CMAKE_DIR "${CMAKE_INSTALL_LIBDIR}/cmake/wick")

install(TARGETS wick EXPORT wickTargets
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
  RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR}
  INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(DIRECTORY "${PROJECT_SOURCE_DIR}/include/wick" DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}
  FILES_MATCHING PATTERN "*.h")
install(FILES "${PROJECT_BINARY_DIR}/include/wick/version.h" DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/wick)

# Torch's location as found now, so consumers find the same LibTorch.
set(WICK_TORCH_DIR "${Torch_DIR}")
if(BUILD_SHARED_LIBS)
  set(WICK_SHARED ON)
else()
  set(WICK_SHARED OFF)
endif()
configure_package_config_file("${PROJECT_SOURCE_DIR}/cmake/wickConfig.cmake.in"
  "${PROJECT_BINARY_DIR}/wickConfig.cmake"
  INSTALL_DESTINATION ${WICK_CMAKE_DIR})
write_basic_package_version_file("${PROJECT_BINARY_DIR}/wickConfigVersion.cmake"
  VERSION ${PROJECT_VERSION} COMPATIBILITY SameMinorVersion)

install(EXPORT wickTargets NAMESPACE wick:: DESTINATION ${WICK_CMAKE_DIR})
install(FILES "${PROJECT_BINARY_DIR}/wickConfig.cmake" "${PROJECT_BINARY_DIR}/wickConfigVersion.cmake"
  DESTINATION ${WICK_CMAKE_DIR})

# Build tree: find_package(wick PATHS <build>) works without installing.
export(EXPORT wickTargets NAMESPACE wick:: FILE "${PROJECT_BINARY_DIR}/wickTargets.cmake")
