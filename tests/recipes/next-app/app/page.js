"use client";
import { useEffect } from "react";

import { installRecipe } from "../../shared/recipe-page.js";

export default function Page() {
  useEffect(installRecipe, []);
  return <main>Next.js recipe: the fal JS SDK through the app's rewrites</main>;
}
